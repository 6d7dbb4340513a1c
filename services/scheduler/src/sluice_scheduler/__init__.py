"""Sluice scheduler service: fires cron triggers stored in the database."""
