-- Workflow versions: every create and update of a workflow stores its definition as an immutable
-- row, and a run executes the version it was queued with (runs.workflow_version), on every
-- attempt, retry and resume.
--
-- workflows keeps the current definition too (the head the API lists and the scheduler loads);
-- workflow_versions is what runs read. The database keeps the two in step, whoever writes: a
-- trigger stores the definition as a new version whenever a workflow is created or its version
-- number changes, and refuses a change of the definition that keeps the version number (a version
-- is immutable once a run may have been queued with it). A run carries (workflow_id, workflow_version) without a
-- foreign key to this table: a key would take a FOR KEY SHARE lock on the same version row for
-- every accepted run of a workflow, a hot lock in a burst. Versions are deleted only by the
-- retention job, and only those of deleted workflows that no run references any more.
-- depends: 0010_check_domains

CREATE TABLE workflow_versions (
    workflow_id uuid NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    version     integer NOT NULL CHECK (version >= 1),
    -- Versions are read per owner, like everything else.
    owner_id    uuid NOT NULL,
    name        text NOT NULL,
    description text,
    trigger     jsonb NOT NULL,
    steps       jsonb NOT NULL,
    settings    jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow_id, version)
);

-- Earlier releases kept only the current definition, and their runs executed whatever was
-- current when they started: the definition as stored now becomes each of versions 1..n, so a
-- run queued before the upgrade (at any version number) finds the definition it would have run.
INSERT INTO workflow_versions (workflow_id, version, owner_id, name, description, trigger, steps, settings, created_at)
SELECT w.id, v.n, w.owner_id, w.name, w.description, w.trigger, w.steps, w.settings, w.updated_at
FROM workflows w CROSS JOIN LATERAL generate_series(1, w.version) AS v(n);

-- Retention finds deleted workflows, whose versions go once no run references them.
CREATE INDEX workflows_deleted_idx ON workflows (deleted_at) WHERE deleted_at IS NOT NULL;

CREATE FUNCTION sluice_save_workflow_version() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.version = OLD.version THEN
        IF (NEW.name, NEW.description, NEW.trigger, NEW.steps, NEW.settings)
           IS DISTINCT FROM (OLD.name, OLD.description, OLD.trigger, OLD.steps, OLD.settings) THEN
            RAISE EXCEPTION 'workflow %: a changed definition needs a new version number', NEW.id
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
        RETURN NULL;
    END IF;
    INSERT INTO workflow_versions (workflow_id, version, owner_id, name, description, trigger, steps, settings)
    VALUES (NEW.id, NEW.version, NEW.owner_id, NEW.name, NEW.description, NEW.trigger, NEW.steps, NEW.settings);
    RETURN NULL;
END
$$;

CREATE TRIGGER workflows_save_version
    AFTER INSERT OR UPDATE OF version, name, description, trigger, steps, settings ON workflows
    FOR EACH ROW EXECUTE FUNCTION sluice_save_workflow_version();
