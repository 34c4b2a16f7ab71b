// node-postgres test app for tests/test_clients.py: warm a pg.Pool, wait for "go", serve 20 requests.
// CLIENT_RECIPE, when set, is the one line `pg-watchdog advise` prints for node-postgres, run as is.
'use strict';
const readline = require('readline');
const { Pool } = require('pg');

// CLIENT_NAMING, when set, is the advised `?application_name=...` for the connection string.
const dsn = process.env.CLIENT_DSN + (process.env.CLIENT_NAMING || '');
const config = { connectionString: dsn, max: Number(process.env.CLIENT_POOL) };
const recipe = process.env.CLIENT_RECIPE || '';
// The advised line declares `pool`; without it the pool is the library's defaults plus our size.
const pool = recipe ? new Function('Pool', 'config', `${recipe}\nreturn pool;`)(Pool, config)
  : new Pool(config);

async function warm(n) {
  const clients = await Promise.all(Array.from({ length: n }, () => pool.connect()));
  const pids = [];
  for (const c of clients) pids.push((await c.query('SELECT pg_backend_pid() AS pid')).rows[0].pid);
  for (const c of clients) c.release();
  return pids;
}

async function serve(n) {
  let ok = 0;
  for (let i = 1; i <= n; i++) {
    try {
      await pool.query('SELECT 1');
      ok++;
      console.log(`request ${i} ok`);
    } catch (err) {
      console.log(`request ${i} failed ${JSON.stringify(String(err.message))}`);
    }
  }
  return ok;
}

(async () => {
  const pids = await warm(config.max);
  console.log(`warm ${pids.join(' ')}`);
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (line.trim() !== 'go') continue;
    const ok = await serve(20);
    console.log(`done ${ok} ${20 - ok}`);
    break;
  }
  lines.close();
  await pool.end();
})();
