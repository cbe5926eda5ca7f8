-- dolly_setup: the extension installs, describes itself, and its model server runs.
CREATE EXTENSION dolly;

SELECT dolly_version() ~ '^dolly [0-9]+\.[0-9]+' AS version_ok;

-- every backend is listed; the CPU is always usable, with at least one thread
SELECT backend, devices >= 1 AS has_devices, detail <> '' AS explained
  FROM dolly_backends() WHERE backend = 'cpu';
SELECT backend, detail <> '' AS explained FROM dolly_backends() ORDER BY backend;

-- one model server, visible with its own backend_type
SELECT count(*) AS model_servers FROM pg_stat_activity
 WHERE backend_type = 'dolly model server';

-- configuration: the prefix is reserved, the values are checked
SHOW dolly.device;
SET dolly.device = 'cpu';
ALTER SYSTEM SET dolly.device = 'tpu';
ALTER SYSTEM SET dolly.threads = -1;
SET dolly.no_such_setting = 1;
