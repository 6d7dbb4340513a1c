-- runs.owner_id copies workflows.owner_id, which already references users (and deleting a user
-- deletes its workflows and, through them, their runs). Its own foreign key only made every new
-- run lock the owner's users row: with many runs accepted at once for one user, that shared lock
-- is a hot spot (a multixact per row) for no integrity gained.
-- depends: 0006_scheduler

ALTER TABLE runs DROP CONSTRAINT runs_owner_id_fkey;
