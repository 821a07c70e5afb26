// Shared by the end-to-end tests and scripts/try-locally: free ports, child processes, WorkOS's
// emulator, rolesync's binary and a throwaway database on either backend. Node >= 20, no npm packages.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const EMULATOR_API_KEY = 'sk_test_default';
/** The AuthKit client id of the e2e runs; the emulator mints `iss` in WorkOS's documented form for it. */
export const CLIENT_ID = 'client_e2e_local';
export const MEMBERSHIP_EVENTS = [
  'organization_membership.created',
  'organization_membership.updated',
  'organization_membership.deleted',
];

/** A port nothing listens on right now (the OS picks it; no test depends on a fixed port). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `probe` until it returns a truthy value; fails naming `what` after `timeoutMs`. */
export async function waitFor(what, probe, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  let last;
  while (Date.now() < deadline) {
    try {
      const value = await probe();
      if (value) return value;
    } catch (e) {
      last = e;
    }
    await sleep(50);
  }
  throw new Error(`timed out waiting for ${what}${last ? `: ${last.message}` : ''}`);
}

/** A child process in a process group of its own, its output kept for a failure report. */
export class Child {
  constructor(name, command, args, env) {
    this.name = name;
    this.output = '';
    this.proc = spawn(command, args, { env: { ...process.env, ...env }, detached: true });
    this.exited = new Promise((resolve) => this.proc.once('exit', (code, signal) => resolve({ code, signal })));
    for (const stream of [this.proc.stdout, this.proc.stderr]) {
      stream.on('data', (chunk) => {
        this.output += chunk;
        if (this.output.length > 200_000) this.output = this.output.slice(-100_000);
      });
    }
  }

  /** SIGTERM to the group (a start script's children too), then SIGKILL after 10 s. */
  async stop() {
    if (this.proc.exitCode !== null || this.proc.signalCode !== null) return this.exited;
    try {
      process.kill(-this.proc.pid, 'SIGTERM');
    } catch {
      return this.exited;
    }
    const timer = setTimeout(() => {
      try {
        process.kill(-this.proc.pid, 'SIGKILL');
      } catch {}
    }, 10_000);
    const result = await this.exited;
    clearTimeout(timer);
    return result;
  }
}

/** How to start WorkOS's emulator: ROLESYNC_EMULATE_START (a command taking `--port N`), else the
 *  copy in ../shared/workos-emulate beside the repository (it installs its runtime, bun, once). */
export function emulatorCommand() {
  if (process.env.ROLESYNC_EMULATE_START) return process.env.ROLESYNC_EMULATE_START.split(' ');
  for (const dir of [path.join(repo, '../shared/workos-emulate'), '/work/shared/workos-emulate']) {
    if (existsSync(path.join(dir, 'start'))) return [path.join(dir, 'start')];
  }
  throw new Error(
    'WorkOS emulator not found: set ROLESYNC_EMULATE_START to a command that starts it, ' +
      "e.g. 'npx --yes @workos/emulate' (https://github.com/workos/emulate)",
  );
}

/** WorkOS's emulator on a free port, with a small client for its API. */
export async function startEmulator() {
  const port = await freePort();
  const [command, ...args] = emulatorCommand();
  // The issuer is pinned to the form WorkOS mints for newer environments (else the emulator's URL).
  const issuer = `https://api.workos.com/user_management/${CLIENT_ID}`;
  const child = new Child('workos-emulate', command, [...args, '--port', String(port), '--host', '127.0.0.1', '--issuer', issuer]);
  const url = `http://127.0.0.1:${port}`;
  // The first start installs the emulator's runtime into a cache folder (npm), hence the wait.
  await waitFor('the WorkOS emulator', async () => (await fetch(`${url}/health`)).ok, 180_000).catch((e) => {
    throw new Error(`${e.message}\n${child.output}`);
  });
  const call = jsonClient(url, EMULATOR_API_KEY);
  const api = async (method, route, body) => {
    const { status, body: answer } = await call(method, route, body);
    if (status < 200 || status > 299) throw new Error(`emulator ${method} ${route}: ${status} ${JSON.stringify(answer)}`);
    return answer;
  };
  return { url, child, api };
}

export function rolesyncBin() {
  return process.env.ROLESYNC_BIN ?? path.join(repo, 'target/debug/rolesync');
}

/** Runs a rolesync command to completion; returns its stdout, throws with its stderr on failure. */
export function rolesync(args, env) {
  const result = spawnSync(rolesyncBin(), args, { env: { ...process.env, ...env }, encoding: 'utf8' });
  if (result.status !== 0) {
    throw new Error(`rolesync ${args.join(' ')} exited ${result.status}: ${result.stderr}`);
  }
  return result.stdout;
}

/** rolesync's settings for a run against the emulator. The catch-up loop is off, so that only
 *  `rolesync sync` heals what webhooks missed, and every login asks WorkOS. */
export function rolesyncEnv({ databaseUrl, emulator, secret, loginToken }) {
  return {
    DATABASE_URL: databaseUrl,
    WORKOS_API_KEY: EMULATOR_API_KEY,
    WORKOS_API_BASE_URL: emulator.url,
    WORKOS_WEBHOOK_SECRET: secret,
    ROLESYNC_LOGIN_TOKEN: loginToken,
    WORKOS_CLIENT_ID: CLIENT_ID,
    ROLESYNC_SYNC_INTERVAL_SECS: '0',
    ROLESYNC_LOGIN_REFRESH_SECS: '0',
    RUST_LOG: 'warn',
  };
}

/** Registers rolesync's webhook endpoint with the emulator, which then signs every delivery. */
export function registerWebhook(emulator, rolesyncUrl, secret) {
  return emulator.api('POST', '/webhook_endpoints', {
    endpoint_url: `${rolesyncUrl}/webhooks/workos`,
    secret,
    events: MEMBERSHIP_EVENTS,
  });
}

/** `rolesync serve` on a free port; resolves once /readyz answers 200. */
export async function startRolesync(env) {
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const child = new Child('rolesync', rolesyncBin(), ['serve'], {
    ROLESYNC_LISTEN: `127.0.0.1:${port}`,
    ROLESYNC_LOG_FORMAT: 'json',
    ...env,
  });
  await waitFor('rolesync serve', async () => (await fetch(`${url}/readyz`)).ok, 30_000).catch((e) => {
    throw new Error(`${e.message}\n${child.output}`);
  });
  return { url, child };
}

/** A throwaway database: a SQLite file in a temporary folder, or a PostgreSQL database of its own
 *  (through psql, on ROLESYNC_TEST_POSTGRES_URL's server) with rolesync in schema `rolesync`. */
export function throwawayDatabase(backend) {
  if (backend === 'sqlite') {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'rolesync-e2e-'));
    return { url: `sqlite://${dir}/rolesync.db`, drop: () => rmSync(dir, { recursive: true, force: true }) };
  }
  const admin = process.env.ROLESYNC_TEST_POSTGRES_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres';
  const name = `rolesync_e2e_${process.pid}_${Math.floor(Math.random() * 1e9)}`;
  const psql = (sql) => {
    const r = spawnSync('psql', [admin, '-v', 'ON_ERROR_STOP=1', '-qc', sql], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`psql ${sql}: ${r.stderr || r.error}`);
  };
  psql(`CREATE DATABASE ${name}`);
  const base = admin.slice(0, admin.lastIndexOf('/'));
  return {
    url: `${base}/${name}?options=-c%20search_path%3Drolesync`,
    drop: () => psql(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`),
  };
}

/** `(method, route, body) => {status, body}`: JSON over HTTP with a bearer token. */
function jsonClient(base, token) {
  return async (method, route, body) => {
    const response = await fetch(base + route, {
      method,
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await response.text();
    return { status: response.status, body: text ? JSON.parse(text) : null };
  };
}

/** Calls rolesync's login and membership endpoints with a bearer token. */
export function rolesyncClient(url, token) {
  const call = jsonClient(url, token);
  return {
    login: (organization_id, user_id) => call('POST', '/v1/reconcile', { organization_id, user_id }),
    /** Sign-in with an AuthKit access token. */
    signIn: (access_token) => call('POST', '/v1/reconcile', { access_token }),
    /** The stored row, or null when rolesync has none (404). */
    stored: async (org, user) => {
      const { status, body } = await call('GET', `/v1/memberships/${org}/${user}`);
      if (status === 404) return null;
      if (status !== 200) throw new Error(`GET /v1/memberships: ${status} ${JSON.stringify(body)}`);
      return body;
    },
  };
}
