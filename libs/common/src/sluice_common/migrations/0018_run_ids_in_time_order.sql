-- New runs get ids in time order: UUIDv7 (RFC 9562), whose first 48 bits are the Unix time in
-- milliseconds, instead of random UUIDv4.
--
-- A run's id leads the primary key of runs and of run_attempts and run_steps, which its attempts
-- and steps are written to when it finishes. With random ids each of those writes lands on a
-- random leaf page of an index that, with a large history, no longer fits in memory: the finish
-- reads a page from disk for it, every first write to a page after a checkpoint writes the whole
-- page to the WAL, and the retention job, which deletes the oldest runs, finds their entries
-- scattered over every leaf. With ids in time order, new entries go to the right edge of these
-- indexes, which stays in memory, and the oldest runs' entries are side by side.
--
-- The services make the ids (sluice_common.runs.new_run_id, the same layout); this default is for
-- rows written any other way. Existing ids stay as they are: ids are opaque, and the old ones age
-- out with the retention. An id now tells when its run was created, to the millisecond, which the
-- run's queued_at says anyway.
-- depends: 0017_attempt_at_end

-- gen_random_uuid() gives the random bits and the variant; the first 6 bytes become the time, and
-- the version nibble goes from 4 (0100) to 7 (0111): set_bit numbers the bits of each byte from
-- its least significant one, so bits 52 and 53 are the two low bits of byte 6's high nibble.
CREATE FUNCTION sluice_run_id() RETURNS uuid
LANGUAGE sql VOLATILE PARALLEL SAFE
AS $$
SELECT encode(
    set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
                            PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint)
                                              FROM 3)
                            FROM 1 FOR 6), 52, 1), 53, 1),
    'hex')::uuid
$$;

ALTER TABLE runs ALTER COLUMN id SET DEFAULT sluice_run_id();
