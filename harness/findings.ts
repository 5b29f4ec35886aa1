// One regression case per finding of #11 (H1, H2, M1–M5, L1–L8, hardening), run against real processes by
// `bun harness security` and harness/security.test.ts. Each case says, in a comment, what the old code
// (39504b0) did instead, so it fails there.
import { createPublicKey, randomUUID, type KeyObject } from "node:crypto";
import { readFileSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type tls from "node:tls";
import { parseCrl } from "../shared/authz/crl.ts";
import { parsePolicy, type Rule } from "../shared/authz/policy.ts";
import { loadFernetKeys, policyPath } from "../shared/platform/config.ts";
import { Fernet } from "../shared/request-path/fernet.ts";
import type { DataSnapshot } from "../shared/request-path/data-view.ts";
import { PROOF_HEADER, ProofSigner } from "../shared/request-path/proof.ts";
import { loadIdentity, mutualTlsClientOptions, type Identity } from "../shared/platform/tls.ts";
import { ON_BEHALF_OF_HEADER, openJoseResponse, prepareJoseRequest, prepareLegacyRequest } from "../shared/token-path/token-exchange.ts";
import { freePort, runPkiSh, waitFor, waitUntilInRotation, type Cluster, type TokenStack } from "./fixtures/index.ts";
import {
  closedWithin,
  connectTls,
  dribbleClosedAfter,
  parseHttpAnswer,
  plainHttp,
  sendChunked,
  startImpostor,
  tlsRefused,
  type Tally,
  type TlsMaterial,
} from "./hostile.ts";

/** Marks the forged log lines of the L1 case, so the log scan can tell whether one ever started a line. */
export const FORGED_MARKER = "forged-l1-5c2e";

/** The stated bound of #11 Part 4: a revocation or a policy edit takes effect within this, with no restart. */
export const RELOAD_BOUND_MS = 5000;

const SPIFFE = (kind: string, name: string) => `spiffe://securemesh/${kind}/${name}`;

/**
 * Identities only the harness uses, issued before the roles start, and what its policy grants them besides
 * roles/policy.json: client-live is revoked while the roles run (M1), client-own may read only its own records
 * (M5), sql-prober may ask for any token so SQL metacharacters reach the token store's query.
 */
export const HARNESS_IDENTITIES: { name: string; allow: string[] }[] = [
  { name: "client-live", allow: ["records.write", "view.read:all"] },
  { name: "client-own", allow: ["records.write", "view.read:own"] },
  { name: "sql-prober", allow: ["proxy.use:*"] },
];

/** Writes a policy as an editor saves it: a new file renamed over the old one. */
export function writePolicy(file: string, rules: readonly Rule[]): void {
  const text = JSON.stringify({ comment: "bun harness security's policy: roles/policy.json plus the harness's own identities", rules }, null, 2);
  parsePolicy(text); // never hand the roles a policy that does not parse
  writeFileSync(`${file}.tmp`, text + "\n");
  renameSync(`${file}.tmp`, file);
}

/**
 * Issues the harness's identities into the roles' PKI (before the roles start) and writes the harness policy:
 * the repository's rules plus HARNESS_IDENTITIES. Returns the rules, for the live edit to restore.
 */
export async function prepareHarnessIdentities(pki: string, policyFile: string): Promise<Rule[]> {
  for (const { name } of HARNESS_IDENTITIES) await runPkiSh(pki, "issue", name, "--client"); // one at a time: each updates the CA's index
  const rules = [
    ...parsePolicy(readFileSync(policyPath(), "utf8")).rules,
    ...HARNESS_IDENTITIES.map(({ name, allow }) => ({ identity: SPIFFE("client", name), allow })),
  ];
  writePolicy(policyFile, rules);
  return rules;
}

/**
 * Seeds client2's marketplace token too (token-stack seeds client1's), so proxy.use:client2/marketplace can be
 * allowed. The demo marketplace knows one API token, so client2's is the same one.
 */
export async function seedClient2Token(cluster: Cluster, stack: TokenStack, tokenDb: string): Promise<string> {
  const token = stack.token;
  const seeded = await cluster.run(
    "keyserver-admin-client2",
    "keyserver",
    ["token", "add", "--client", "client2", "--type", "marketplace", "--token", "-", "--data", stack.dataDir, "--db", tokenDb],
    { stdin: token },
  );
  if (seeded.exitCode !== 0) throw new Error(`token add for client2 failed:\n${seeded.lines.join("\n")}`);
  return token;
}

export interface FindingTargets {
  cluster: Cluster;
  coordinator: string;
  /** server 1 and server 2 */
  servers: [string, string];
  /** The coordinator's admin listener, http://127.0.0.1:PORT */
  admin: string;
  stack: TokenStack;
  tokenDb: string;
  policyFile: string;
  /** The harness policy's rules as written at start, restored after the live edit. */
  rules: readonly Rule[];
  hostileCerts: Record<string, TlsMaterial>;
}

export interface FindingOptions {
  /** The harness's fuller run: more attempts, and the cases that start processes of their own (M3, M4). */
  full: boolean;
}

export interface Measurement {
  what: string;
  /** ms from the change until every check held, or null when they did not within the timeout */
  ms: number | null;
  each: Record<string, number | null>;
}

type Json = Record<string, unknown>;

/**
 * Starts the clock, applies `change`, and polls every check until all hold in one round: returns the time until
 * each first held, and until all did. `timeoutMs` after the change it gives up.
 */
export async function measureUntil(
  what: string,
  change: () => Promise<unknown> | unknown,
  checks: Record<string, () => Promise<boolean>>,
  timeoutMs = 3 * RELOAD_BOUND_MS,
): Promise<Measurement> {
  const started = performance.now();
  await change();
  const each: Record<string, number | null> = Object.fromEntries(Object.keys(checks).map((k) => [k, null]));
  for (;;) {
    const results = await Promise.all(
      Object.entries(checks).map(async ([name, check]) => {
        const held = await check().catch(() => false);
        if (held && each[name] === null) each[name] = Math.round(performance.now() - started);
        return held;
      }),
    );
    const elapsed = performance.now() - started;
    if (results.every(Boolean)) return { what, ms: Math.round(elapsed), each };
    if (elapsed > timeoutMs) return { what, ms: null, each };
    await Bun.sleep(100); // a poll interval between rounds of checks, not a wait for time to pass
  }
}

const describeMeasurement = (m: Measurement) =>
  `${m.what}: ${m.ms === null ? "NOT within the timeout" : `${m.ms} ms`} (bound ${RELOAD_BOUND_MS} ms; ${Object.entries(m.each)
    .map(([k, v]) => `${k} ${v === null ? "never" : `${v} ms`}`)
    .join(", ")})`;

/** Runs every finding case into `tally`; returns the measured reload times, for the summary. */
export async function runFindingCases(t: FindingTargets, tally: Tally, options: FindingOptions): Promise<Measurement[]> {
  const { cluster, stack } = t;
  const pki = cluster.pki;
  const [server1, server2] = t.servers;
  const identity = (name: string) => loadIdentity(pki, name);
  const tlsOf = (name: string) => mutualTlsClientOptions(identity(name));
  const signers = new Map<string, ProofSigner>();
  const signer = (name: string) => signers.get(name) ?? signers.set(name, new ProofSigner(identity(name))).get(name)!;
  const signerOf = (material: TlsMaterial) => new ProofSigner({ name: "x", cert: material.cert!, key: material.key!, ca: material.ca } as Identity);
  const fernet = new Fernet(loadFernetKeys(pki));
  const client1 = tlsOf("client1");
  const client2 = tlsOf("client2");
  const proxyTls = tlsOf("secureproxy");
  /** What holds a connection to a server as the coordinator does: the servers decide `forward` on it. */
  const coordinatorTls = tlsOf("coordinator");
  const n = options.full ? 5 : 1;
  const measurements: Measurement[] = [];

  // keepalive off: no connection opened under one certificate can carry a request meant for another.
  const call = (url: string, tls: TlsMaterial, init: RequestInit = {}) =>
    fetch(url, { ...init, tls, keepalive: false, signal: AbortSignal.timeout(10_000) } as RequestInit);
  const postJson = (url: string, tls: TlsMaterial, body: unknown, headers: Record<string, string> = {}) =>
    call(url, tls, {
      method: "POST",
      headers: { "content-type": "application/json", ...headers },
      body: typeof body === "string" ? body : JSON.stringify(body),
    });
  const answer = async (response: Response) => {
    const text = await response.text();
    let body: Json = {};
    try {
      body = JSON.parse(text) as Json;
    } catch {
      body = { raw: text.slice(0, 120) };
    }
    return { status: response.status, body, text: text.slice(0, 200) };
  };
  /**
   * A write with `who`'s proof: through the coordinator over `tls`, or at a server (`at`) over the coordinator's own
   * certificate, as the coordinator forwards it.
   */
  const write = async (who: ProofSigner, tls: TlsMaterial, options: { at?: string; url?: string; headers?: Record<string, string>; data?: string } = {}) => {
    const data = options.data ?? fernet.encrypt(`finding write ${randomUUID()}`);
    const proof = await who.sign({ method: "POST", path: "/api/data", payload: data });
    return answer(
      await postJson(`${options.at ?? options.url ?? t.coordinator}/api/data`, options.at ? coordinatorTls : tls, { data, proof }, options.headers),
    );
  };
  const expectStatus = (got: { status: number; text: string }, status: number, text?: string | RegExp) => {
    if (got.status !== status) return `answered ${got.status} (wanted ${status}): ${got.text}`;
    if (text !== undefined && !(typeof text === "string" ? got.text.includes(text) : text.test(got.text)))
      return `answered ${got.status} without ${text}: ${got.text}`;
    return null;
  };
  const forbidden = (who: string, permission: string) => `${who} lacks permission ${permission}`;
  const { itemUri } = stack;
  const proxyAs = async (tls: TlsMaterial, clientId: string) =>
    answer(await postJson(`${stack.secureproxy}/request_api`, tls, { ClientId: clientId, TokenType: "marketplace", ApiUri: itemUri }));
  let keyserverKey: KeyObject | undefined;
  /** A JOSE token request straight to the KeyServer over `tls`, naming `onBehalfOf`; 200 only when the token opens. */
  const keyserverAs = async (tls: TlsMaterial, onBehalfOf: string | null, clientId = "client1", tokenType = "marketplace") => {
    keyserverKey ??= createPublicKey(((await (await call(`${stack.keyserver}/public_key`, proxyTls)).json()) as { public_key: string }).public_key);
    const prepared = await prepareJoseRequest(keyserverKey, clientId, tokenType);
    const headers: Record<string, string> = { "content-type": prepared.contentType, ...(onBehalfOf ? { [ON_BEHALF_OF_HEADER]: onBehalfOf } : {}) };
    const response = await call(`${stack.keyserver}/`, tls, { method: "POST", headers, body: prepared.body });
    if (response.status !== 200) return answer(response);
    const released = await openJoseResponse(await response.text(), prepared.sessionKey).catch(() => "");
    return { status: released ? 200 : 0, body: {}, text: released ? "released" : "200 that does not open" };
  };
  const healthy = async (url: string, role: string) => {
    const health = await cluster.health(url);
    if (health?.status !== 200) return `${role} /health afterwards: ${health ? health.status : "no answer"}`;
    return cluster.role(role).running ? null : `${role} exited`;
  };
  const auditLines = (pattern: RegExp) => cluster.role("keyserver").lines.filter((l) => pattern.test(l)).length;
  const waitForAudit = (pattern: RegExp, before: number) =>
    waitFor(`a KeyServer audit line matching ${pattern}`, () => auditLines(pattern) > before, 5000).then(
      () => null,
      (e: Error) => e.message,
    );

  const roles: [string, string][] = [
    ["server1", server1],
    ["coordinator", t.coordinator],
    ["keyserver", stack.keyserver],
    ["secureproxy", stack.secureproxy],
  ];
  const ids = {
    client1: SPIFFE("client", "client1"),
    client2: SPIFFE("client", "client2"),
    coordinator: SPIFFE("coordinator", "coordinator"),
    secureproxy: SPIFFE("secureproxy", "secureproxy"),
  };

  // ---- H1: the proxy knows who calls it. Old: ClientId came from the body, client2 and the coordinator got 200.
  await tally.run("secureproxy", "H1: client2 asks for ClientId client1's token → 403", n, async () =>
    expectStatus(await proxyAs(client2, "client1"), 403, forbidden(ids.client2, "proxy.use:client1/marketplace")),
  );
  await tally.run("secureproxy", "H1: the coordinator's certificate asks for client1's token → 403", n, async () =>
    expectStatus(await proxyAs(tlsOf("coordinator"), "client1"), 403, forbidden(ids.coordinator, "proxy.use:client1/marketplace")),
  );
  // Old: the audit line said caller=secureproxy client=client1; the original caller was recorded nowhere.
  await tally.run("keyserver", "H1: the KeyServer's audit names the proxy and the original caller", n, async () => {
    const line = new RegExp(`^AUDIT .*caller=${ids.secureproxy} on_behalf_of=${ids.client1} client=client1 type=marketplace outcome=released`);
    const before = auditLines(line);
    const ok = await proxyAs(client1, "client1");
    if (ok.status !== 200) return `client1 through the proxy: ${ok.status} ${ok.text}`;
    return waitForAudit(line, before);
  });
  // Defence in depth: even the proxy's own certificate cannot get client1's token for client2.
  await tally.run("keyserver", "H1: the proxy's certificate on behalf of client2 for client1's token → 403, audited", n, async () => {
    const line = new RegExp(`^AUDIT .*caller=${ids.secureproxy} on_behalf_of=${ids.client2} client=client1 type=marketplace outcome=forbidden`);
    const before = auditLines(line);
    const problem = expectStatus(await keyserverAs(proxyTls, ids.client2), 403, forbidden(ids.client2, "proxy.use:client1/marketplace"));
    return problem ?? waitForAudit(line, before);
  });

  // ---- H2: an aborted body never stops a role. Old: the KeyServer's node:https listener died on "aborted"/ECONNRESET.
  for (const [role, url] of roles) {
    const path = role === "secureproxy" ? "/request_api" : role === "keyserver" ? "/" : "/api/data";
    await tally.run(role, "H2: a body declared 1000 bytes, 5 sent, then close", n, async () => {
      const socket = await startBody(url, client1, path);
      socket.end();
      await closedWithin(socket, 5000);
      socket.destroy();
      return healthy(url, role);
    });
    await tally.run(role, "H2: a body declared 1000 bytes, 5 sent, then a reset", n, async () => {
      const socket = await startBody(url, client1, path);
      socket.resetAndDestroy();
      return healthy(url, role);
    });
  }

  // ---- M1: proofs are checked against the CRL. Old: a revoked certificate's proof over client2's TLS was stored, 200.
  const revoked = t.hostileCerts.revoked!;
  await tally.run("server", "M1: a proof signed by a revoked certificate, over client2's TLS → 401", n, async () =>
    expectStatus(await write(signerOf(revoked), client2), 401, "revoked"),
  );

  // ---- M5: reads need a proof, and view.read:own sees only its own. Old: get_cached_data needed nothing.
  await tally.run("server", "M5: a read without a proof → 401", n, async () =>
    expectStatus(await answer(await call(`${t.coordinator}/api/get_cached_data`, client1)), 401),
  );
  await tally.run("server", "M5: view.read:own (client-own) sees only its own records", 1, async () => {
    const own = tlsOf("client-own");
    const stored = await write(signer("client-own"), own);
    if (stored.status !== 200) return `client-own's write: ${stored.status} ${stored.text}`;
    const proof = await signer("client-own").sign({ method: "GET", path: "/api/get_cached_data", payload: "" });
    const read = await answer(await call(`${t.coordinator}/api/get_cached_data`, own, { headers: { [PROOF_HEADER]: proof, "cache-control": "no-cache" } }));
    if (read.status !== 200 || typeof read.body.data !== "string") return `client-own's read: ${read.status} ${read.text}`;
    const view = JSON.parse(fernet.decryptText(read.body.data)) as DataSnapshot;
    const senders = new Set([...Object.keys(view.bySender), ...view.latest.map((r) => r.sender)]);
    return senders.size === 1 && senders.has("client-own") && view.total === view.bySender["client-own"]
      ? null
      : `client-own saw ${[...senders].join(", ")} (${view.total} records)`;
  });

  // ---- L1: no forged log lines. Old: the coordinator logged a server's "unexpected field: <name>" raw.
  // Escapes first: a role that shortens the echoed name still echoes them.
  const evilName = `\u001b[2J\u001b]0;pwned\u0007\n127.0.0.1 - - [01/Jan/2030 00:00:00] "POST /${FORGED_MARKER} HTTP/1.1" 200 -\nServer https://127.0.0.1:1 is back in rotation ${FORGED_MARKER}`;
  await tally.run("coordinator", "L1: a field name with a newline, a fake access line and escapes (invalidate)", n, async () => {
    const proof = await signer("client1").sign({ method: "POST", path: "/api/invalidate_cache", payload: "" });
    return expectStatus(await answer(await postJson(`${t.coordinator}/api/invalidate_cache`, client1, { proof, [evilName]: 1 })), 400);
  });
  await tally.run("coordinator", "L1: the same field name in a write", n, async () =>
    expectStatus(await answer(await postJson(`${t.coordinator}/api/data`, client1, { data: "x", proof: "y", [evilName]: 1 })), 400),
  );
  await tally.run("keyserver", "L1: the same field name in a token request", n, async () =>
    expectStatus(
      await answer(await postJson(`${stack.keyserver}/`, proxyTls, { sessionKey: "a", clientId: "client1", tokenType: "marketplace", [evilName]: 1 })),
      400,
    ),
  );
  await tally.run("secureproxy", "L1: the same field name, and in ClientId", n, async () => {
    const extra = expectStatus(
      await answer(
        await postJson(`${stack.secureproxy}/request_api`, client1, { ClientId: "client1", TokenType: "marketplace", ApiUri: itemUri, [evilName]: 1 }),
      ),
      400,
    );
    // Not a plain name: refused before the policy is asked (400), and logged escaped.
    return (
      extra ??
      expectStatus(
        await answer(await postJson(`${stack.secureproxy}/request_api`, client1, { ClientId: evilName, TokenType: "marketplace", ApiUri: itemUri })),
        400,
      )
    );
  });
  // (scanLogs checks afterwards that no log line starts with the forged text and no log holds an escape sequence.)

  // ---- L2: the coordinator logs and counts the upstream's status. Old: every answer was logged and counted 200.
  await tally.run("coordinator", "L2: a 401 and a 403 from the servers are logged and counted as 401 and 403", 1, async () => {
    const metric = async (status: number) => {
      const text = await (await fetch(`${t.admin}/metrics`, { signal: AbortSignal.timeout(5000) })).text();
      return [
        ...text.matchAll(new RegExp(`^securemesh_http_requests_total\\{[^}]*route="/api/\\*"[^}]*method="POST"[^}]*status="${status}"[^}]*\\} (\\d+)`, "gm")),
      ].reduce((sum, m) => sum + Number(m[1]), 0);
    };
    const lines = (status: number) => cluster.role("coordinator").lines.filter((l) => l.includes(`"POST /api/data HTTP/1.1" ${status} -`)).length;
    const before = { m401: await metric(401), m403: await metric(403), l401: lines(401), l403: lines(403) };
    const denied = await write(signer("coordinator"), tlsOf("coordinator"));
    const unproven = await answer(await postJson(`${t.coordinator}/api/data`, client1, { data: fernet.encrypt("no proof") }));
    if (denied.status !== 403 || unproven.status !== 401) return `answers ${denied.status} and ${unproven.status}, wanted 403 and 401`;
    return waitFor(
      "the coordinator's access lines and /metrics to show 401 and 403",
      async () => lines(401) > before.l401 && lines(403) > before.l403 && (await metric(401)) > before.m401 && (await metric(403)) > before.m403,
      5000,
    ).then(
      () => null,
      async () =>
        `access lines 401: ${lines(401) - before.l401}, 403: ${lines(403) - before.l403}; /metrics 401: +${(await metric(401)) - before.m401}, 403: +${(await metric(403)) - before.m403}`,
    );
  });

  // ---- L3: invalidation proofs are single-use and live 60 s + skew. Old: one proof worked 5 times, and 75 s later.
  await tally.run("server", "L3: an invalidation proof replayed through the coordinator → every server refuses", n, async () => {
    const body = { proof: await signer("client1").sign({ method: "POST", path: "/api/invalidate_cache", payload: "" }) };
    const first = await answer(await postJson(`${t.coordinator}/api/invalidate_cache`, client1, body));
    if (first.status !== 200 || (first.body.acknowledged as unknown[]).length !== 2) return `first use: ${first.status} ${first.text}`;
    const again = await answer(await postJson(`${t.coordinator}/api/invalidate_cache`, client1, body));
    const failed = (again.body.failed ?? []) as { status: number }[];
    return again.status === 401 && (again.body.acknowledged as unknown[]).length === 0 && failed.length === 2 && failed.every((f) => f.status === 401)
      ? null
      : `replay: ${again.status} ${again.text}`;
  });
  await tally.run("server", "L3: an invalidation proof signed 75 s ago → refused", n, async () => {
    const proof = await signer("client1").sign({ method: "POST", path: "/api/invalidate_cache", payload: "" }, Date.now() / 1000 - 75);
    const stale = await answer(await postJson(`${t.coordinator}/api/invalidate_cache`, client1, { proof }));
    return stale.status === 401 && (stale.body.acknowledged as unknown[]).length === 0 ? null : `${stale.status} ${stale.text}`;
  });

  // ---- L4: only clients write, only through the coordinator. Old: any clientAuth certificate wrote, to any server.
  await tally.run("server", "L4: the coordinator's proof cannot write → 403", n, async () =>
    expectStatus(await write(signer("coordinator"), tlsOf("coordinator")), 403, forbidden(ids.coordinator, "records.write")),
  );
  await tally.run("server", "L4: the secureproxy's proof cannot write → 403", n, async () =>
    expectStatus(await write(signer("secureproxy"), proxyTls), 403, forbidden(ids.secureproxy, "records.write")),
  );
  await tally.run("server", "L4: client1 calling a server directly, with its own valid proof → 403 (its certificate lacks forward)", n, async () => {
    const data = fernet.encrypt("direct");
    const proof = await signer("client1").sign({ method: "POST", path: "/api/data", payload: data });
    return expectStatus(await answer(await postJson(`${server1}/api/data`, client1, { data, proof })), 403, forbidden(ids.client1, "forward"));
  });
  // Issue 18 H1: a forwarded request carried a bearer forwarder assertion; captured by an impostor, it let client2's
  // TLS write at server 1 (200). Now whatever a forwarded request carries opens nothing without the coordinator's
  // own connection: the whole request as the coordinator sends it, replayed over client2's TLS, at every server.
  for (const [name, url] of [
    ["server1", server1],
    ["server2", server2],
  ] as const) {
    await tally.run(name, "H1: a request as the coordinator forwards it, replayed over client2's TLS → 403", n, async () => {
      const data = fernet.encrypt("captured on its way to a server");
      const proof = await signer("client1").sign({ method: "POST", path: "/api/data", payload: data });
      const headers = { "idempotency-key": randomUUID(), traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" };
      return expectStatus(await answer(await postJson(`${url}/api/data`, client2, { data, proof }, headers)), 403, forbidden(ids.client2, "forward"));
    });
  }

  // ---- L5: idempotency keys belong to their sender. Old: client1 got client2's record id, or 409.
  await tally.run("server", "L5: client1 reusing client2's Idempotency-Key gets a record of its own", n, async () => {
    const key = `shared-${randomUUID()}`;
    const data = fernet.encrypt("idempotent D");
    const theirs = await write(signer("client2"), client2, { data, headers: { "idempotency-key": key } });
    const mine = await write(signer("client1"), client1, { data, headers: { "idempotency-key": key } });
    const other = await write(signer("client1"), client1, { headers: { "idempotency-key": `${key}-2` } });
    const otherTheirs = await write(signer("client2"), client2, { headers: { "idempotency-key": `${key}-2` } });
    if (theirs.status !== 200 || mine.status !== 200 || other.status !== 200 || otherTheirs.status !== 200) {
      return `answers ${theirs.status}, ${mine.status}, ${other.status}, ${otherTheirs.status}: ${mine.text} ${otherTheirs.text}`;
    }
    return theirs.body.id !== mine.body.id && other.body.id !== otherTheirs.body.id
      ? null
      : `shared record ids: ${theirs.body.id}/${mine.body.id}, ${other.body.id}/${otherTheirs.body.id}`;
  });

  // ---- L6: the body limit counts bytes read. Old: a 201,387-byte chunked body was stored.
  const chunkedBody = (() => {
    const prefix = '{"data":"';
    const suffix = '","proof":"y"}';
    return new TextEncoder().encode(prefix + "A".repeat(201_387 - prefix.length - suffix.length) + suffix);
  })();
  const chunkedTargets: [string, string, string, TlsMaterial][] = [
    ["coordinator", t.coordinator, "/api/data", client1],
    ["server1", server1, "/api/data", coordinatorTls],
    ["keyserver", stack.keyserver, "/", proxyTls],
    ["secureproxy", stack.secureproxy, "/request_api", client1],
  ];
  for (const [role, url, path, tls] of chunkedTargets) {
    await tally.run(role, "L6: a 201,387-byte chunked body → 413 JSON", n, async () => {
      const head = `POST ${path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n`;
      const raw = parseHttpAnswer(await sendChunked(url, tls, head, chunkedBody));
      if (!raw) return "no answer";
      let code: unknown;
      try {
        code = (JSON.parse(raw.body) as Json).code;
      } catch {
        return `${raw.status} without JSON: ${raw.body.slice(0, 80)}`;
      }
      if (raw.status !== 413) return `${raw.status} ${String(code)}: ${raw.body.slice(0, 100)}`;
      // The coordinator must count the bytes itself, not buffer them all and pass a server's 413 on.
      return raw.headers["x-securemesh-upstream"] === undefined
        ? null
        : `the 413 came from ${raw.headers["x-securemesh-upstream"]}: the coordinator read the whole body and forwarded it`;
    });
  }

  // ---- L7: the client prints others' text through printable(). Old: client2's text cleared client1's screen.
  await tally.run("client", "L7: client1's output after client2 stored escape sequences has no ESC byte", 1, async () => {
    const evil = '\u001b[2J\u001b[H\u001b]0;pwned\u0007\n[client1] Success: {"result":"ok","id":0,"server":0}';
    const stored = await write(signer("client2"), client2, { data: fernet.encrypt(evil) });
    if (stored.status !== 200) return `client2's write: ${stored.status} ${stored.text}`;
    const run = await cluster.runClient("l7-client1", ["--name", "client1", "--coordinator", t.coordinator, "--message", "after the escapes"]);
    const output = run.lines.join("\n");
    if (run.exitCode !== 0) return `client1 exited ${run.exitCode}: ${output.slice(0, 200)}`;
    if (/[\u001b\u0007\u009b]/.test(output)) return `an escape byte in client1's output: ${JSON.stringify(output.slice(0, 200))}`;
    const successes = run.lines.filter((l) => l.startsWith("[client1] Success")).length;
    if (!output.includes("\\x1b[2J")) return `client2's text was not shown escaped: ${output.slice(0, 200)}`;
    return successes === 1 ? null : `${successes} lines start with "[client1] Success"`;
  });

  // ---- L8: the original format needs a timestamp and nonce. Old: the same body was released 3 times.
  await tally.run("keyserver", "L8: original format without timestamp and nonce → refused", Math.max(n, 3), async () => {
    keyserverKey ??= createPublicKey(((await (await call(`${stack.keyserver}/public_key`, proxyTls)).json()) as { public_key: string }).public_key);
    const { body } = await prepareLegacyRequest(keyserverKey, "client1", "marketplace");
    const { timestamp: _t, nonce: _n, ...bare } = JSON.parse(body) as Json;
    const got = await answer(await postJson(`${stack.keyserver}/`, proxyTls, bare, { [ON_BEHALF_OF_HEADER]: ids.client1 }));
    return got.status === 401 && got.body.code === "ERR_REPLAY" ? null : `${got.status} ${got.text}`;
  });
  await tally.run("keyserver", "L8: original format, the same nonce twice → the second refused", n, async () => {
    keyserverKey ??= createPublicKey(((await (await call(`${stack.keyserver}/public_key`, proxyTls)).json()) as { public_key: string }).public_key);
    const { body } = await prepareLegacyRequest(keyserverKey, "client1", "marketplace");
    const headers = { [ON_BEHALF_OF_HEADER]: ids.client1 };
    const first = await answer(await postJson(`${stack.keyserver}/`, proxyTls, body, headers));
    if (first.status !== 200) return `first: ${first.status} ${first.text}`;
    const second = await answer(await postJson(`${stack.keyserver}/`, proxyTls, body, headers));
    return second.status === 401 && second.body.code === "ERR_REPLAY" ? null : `second: ${second.status} ${second.text}`;
  });

  // ---- Hardening: the admin listener checks Host (DNS rebinding). Old: any Host was served.
  await tally.run("coordinator", "Hardening: admin listener with Host: evil.example → refused", n, async () => {
    const raw = parseHttpAnswer(await plainHttp(t.admin, "GET /status HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"));
    return raw && raw.status >= 400 && raw.status < 500 && !raw.body.includes("serversUp")
      ? null
      : `answered ${raw ? `${raw.status} ${raw.body.slice(0, 80)}` : "nothing"}`;
  });
  await tally.run("coordinator", "Hardening: admin listener with Host: 127.0.0.1:<port> → served", n, async () => {
    const raw = parseHttpAnswer(await plainHttp(t.admin, `GET /status HTTP/1.1\r\nHost: ${new URL(t.admin).host}\r\nConnection: close\r\n\r\n`));
    return raw?.status === 200 && raw.body.includes("serversUp") ? null : `answered ${raw ? `${raw.status} ${raw.body.slice(0, 80)}` : "nothing"}`;
  });

  // ---- Hardening: every hop checks whom it reached. Old: any certificate of the CA passed as a server or a KeyServer.
  const unexpectedPeer = /UNEXPECTED_PEER.*expected spiffe:\/\/securemesh\/server\/\*/;
  await tally.run("coordinator", "Hardening: \"servers\" presenting the KeyServer's and the proxy's identities: refused, nothing forwarded", 1, async () => {
    const { port } = await cluster.spawn("refuses-coordinator", "coordinator", [
      "0",
      "--servers",
      `${stack.keyserver},${stack.secureproxy}`,
      "--health-interval",
      "200",
    ]);
    const url = `https://127.0.0.1:${port}`;
    try {
      const checked = await waitFor(
        "both of refuses-coordinator's servers to be health-checked",
        async () => {
          const h = await cluster.health(url);
          const servers = (h?.body.servers ?? []) as { lastError: string | null; lastCheckedAt: number | null }[];
          return servers.length === 2 && servers.every((s) => s.lastCheckedAt !== null && s.lastError) ? h : undefined;
        },
        10_000,
      );
      const errors = (checked.body.servers as { lastError: string }[]).map((s) => s.lastError);
      if (!errors.every((e) => unexpectedPeer.test(e))) return `health checks: ${errors.join("; ")}`;
      // Refused at the handshake ("no server is up" once the checks took them out, or the forward's own refusal).
      const through = await write(signer("client1"), client1, { url });
      if (through.status !== 503) return `a write through it answered ${through.status}: ${through.text}`;
      const after = await cluster.health(url);
      if (after?.status !== 503) return `after the refused forwards its /health answered ${after?.status}, not 503 (no server up)`;
      const reached = ["keyserver", "secureproxy"].flatMap((r) => cluster.role(r).lines.filter((l) => l.includes("/api/data")));
      return reached.length === 0 ? null : `reached: ${reached[0]}`;
    } finally {
      await cluster.kill("refuses-coordinator");
    }
  });
  await tally.run("secureproxy", 'Hardening: a "KeyServer" presenting a server identity is refused, nothing sent', 1, async () => {
    const before = cluster.role("server1").lines.filter((l) => /public_key|"POST \/ /.test(l)).length;
    const marketPort = new URL(stack.marketplace).port;
    const url = await cluster.startRole("refuses-secureproxy", "secureproxy", [
      "0",
      "--keyserver",
      server1,
      "--allow",
      `marketplace=localhost:${marketPort},127.0.0.1:${marketPort}`,
    ]);
    try {
      const got = await answer(await postJson(`${url}/request_api`, client1, { ClientId: "client1", TokenType: "marketplace", ApiUri: itemUri }));
      if (got.status !== 502 || got.body.code !== "ERR_KEYSERVER_IDENTITY") return `answered ${got.status}: ${got.text}`;
      const after = cluster.role("server1").lines.filter((l) => /public_key|"POST \/ /.test(l)).length;
      return after === before ? null : "the request reached server 1";
    } finally {
      await cluster.kill("refuses-secureproxy");
    }
  });

  // ---- Issue 18: every outbound hop pins an identity. Before, the API hop trusted any mesh certificate naming the
  // API's host (M1: a server certificate on :5005 was handed client1's token), and a client any one on the
  // coordinator's port.
  await tally.run("secureproxy", "M1: a server certificate on the API's allowlisted port gets no token; nothing sent", 1, async () => {
    await using impostor = await startImpostor(pki, "server", await freePort());
    const url = await cluster.startRole("refuses-api-secureproxy", "secureproxy", [
      "0",
      "--keyserver",
      stack.keyserver,
      "--allow",
      `marketplace=127.0.0.1:${impostor.port}`,
    ]);
    try {
      const got = await answer(
        await postJson(`${url}/request_api`, client1, { ClientId: "client1", TokenType: "marketplace", ApiUri: `https://127.0.0.1:${impostor.port}/api/item` }),
      );
      if (got.status !== 502 || !/unexpected peer identity|UNEXPECTED_PEER|expected spiffe:\/\/securemesh\/marketplace\/marketplace/.test(got.text))
        return `answered ${got.status}: ${got.text}`;
      return impostor.bytes === 0 ? null : `the impostor received ${impostor.bytes} bytes`;
    } finally {
      await cluster.kill("refuses-api-secureproxy");
    }
  });
  await tally.run("client", "H1: a server certificate on a coordinator's port gets nothing from a client", 1, async () => {
    await using impostor = await startImpostor(pki, "server", await freePort());
    const client = cluster.client("client1", [`https://127.0.0.1:${impostor.port}`]);
    try {
      const outcome = await client.sendData("to whoever answers").then(
        (r) => `answered ${r.status}`,
        (error: Error) => error.message,
      );
      if (!/unexpected peer identity|reached spiffe:\/\/securemesh\/server\/server, expected spiffe:\/\/securemesh\/coordinator/.test(outcome))
        return `the client: ${outcome}`;
      return impostor.bytes === 0 ? null : `the impostor received ${impostor.bytes} bytes`;
    } finally {
      client.close();
    }
  });

  // ---- M3 and M4 start processes of their own: only in the harness's full run (bun test covers both elsewhere).
  if (options.full) {
    // Old: one global nonce store; client2 filling it got client1 503 ERR_REPLAY_MEMORY_FULL.
    await tally.run("keyserver", "M3: client2 exhausting its nonce quota (3 here) does not stop client1", 1, async () => {
      const url = await cluster.startRole("keyserver-quota", "keyserver", ["0", "--data", stack.dataDir, "--db", t.tokenDb, "--replay-quota", "3"]);
      try {
        const ask = async (onBehalfOf: string, clientId: string) => {
          const prepared = await prepareJoseRequest(
            keyserverKey ?? createPublicKey(((await (await call(`${url}/public_key`, proxyTls)).json()) as { public_key: string }).public_key),
            clientId,
            "marketplace",
          );
          return (
            await call(`${url}/`, proxyTls, {
              method: "POST",
              headers: { "content-type": prepared.contentType, [ON_BEHALF_OF_HEADER]: onBehalfOf },
              body: prepared.body,
            })
          ).status;
        };
        const flood = [];
        for (let i = 0; i < 4; i++) flood.push(await ask(ids.client2, "client2"));
        const genuine = await ask(ids.client1, "client1");
        return flood.join(",") === "200,200,200,429" && genuine === 200 ? null : `client2: ${flood.join(",")}; client1: ${genuine}`;
      } finally {
        await cluster.kill("keyserver-quota");
      }
    });
    // Old: after rotate-key every proxy call got 502 until the KeyServer restarted.
    await tally.run("keyserver", "M4: token rotate-key while releases run → 0 failed releases", 1, async () => {
      let stop = false;
      const failures: string[] = [];
      let releases = 0;
      const traffic = (async () => {
        while (!stop) {
          const got = await proxyAs(client1, "client1");
          releases += 1;
          if (got.status !== 200) failures.push(`${got.status} ${got.text}`);
        }
      })();
      const rotated = await cluster.run("keyserver-rotate", "keyserver", ["token", "rotate-key", "--data", stack.dataDir, "--db", t.tokenDb]);
      const after = releases;
      await waitFor("20 more releases after the rotation", () => releases >= after + 20, 15_000);
      stop = true;
      await traffic;
      if (rotated.exitCode !== 0) return `rotate-key exited ${rotated.exitCode}: ${rotated.lines.join(" ")}`;
      return failures.length === 0 ? null : `${failures.length} of ${releases} releases failed: ${failures[0]}`;
    });
  }

  // ---- M1, live: ./pki.sh revoke with the roles running. Old: the CRL was read only at start.
  await tally.run(
    "all",
    `M1: ./pki.sh revoke client-live with the roles running → its proofs and TLS refused within ${RELOAD_BOUND_MS / 1000} s`,
    1,
    async () => {
      const live = tlsOf("client-live");
      const liveSigner = signer("client-live");
      const before = await write(liveSigner, live);
      if (before.status !== 200) return `client-live could not write before the revocation: ${before.status} ${before.text}`;
      for (const [role, url] of [...roles, ["server2", server2]] as const) {
        if ((await tlsRefused(url, live)) === null) return `client-live's TLS to ${role} was refused before the revocation`;
      }
      const refusedAt = (url: string) => async () => (await tlsRefused(url, live)) === null;
      // Issue 18, L1: a connection client-live opened before its revocation, kept alive. Bun servers went on answering
      // /health and /metrics on it (and on new ones: they read the CRL only at start); now every request is refused.
      const kept = await Promise.all(
        [server1, t.coordinator].map(async (url) => {
          const socket = await connectTls(url, live);
          socket.on("error", () => {});
          return { url, socket };
        }),
      );
      const healthOn = (socket: tls.TLSSocket) =>
        new Promise<number>((resolve) => {
          let raw = "";
          const onData = (chunk: Buffer) => {
            raw += chunk.toString();
            const answer = parseHttpAnswer(raw);
            if (answer) {
              socket.off("data", onData);
              resolve(answer.status);
            }
          };
          socket.on("data", onData);
          socket.once("close", () => resolve(0));
          if (socket.destroyed) resolve(0);
          else socket.write("GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n");
        });
      for (const { url, socket } of kept)
        if ((await healthOn(socket)) !== 200) return `client-live's kept connection to ${url} got no 200 before the revocation`;
      const keptRefused = (socket: tls.TLSSocket) => async () => (await healthOn(socket)) !== 200;
      // Everyone else's traffic runs through the reload: Part 4 says no in-flight request is dropped. The writes
      // carry no Idempotency-Key, so a request the coordinator loses is not quietly re-sent. They go as the client
      // library sends them, which tries again on a connection refused or reset before any request was taken: the
      // coordinator's listener swap (SO_REUSEPORT) resets connections still queued on the old socket.
      let reloading = true;
      const dropped: string[] = [];
      let sent = 0;
      const client1Mesh = cluster.client("client1", [t.coordinator]);
      const client1Signer = signer("client1");
      const traffic = Promise.all([
        (async () => {
          while (reloading) {
            const data = fernet.encrypt(`write during the reload ${randomUUID()}`);
            const proof = await client1Signer.sign({ method: "POST", path: "/api/data", payload: data });
            const got = await client1Mesh.request("POST", "/api/data", { data, proof }).then(
              (r) => ({ status: r.status, text: JSON.stringify(r.body) }),
              (e: Error) => ({ status: 0, text: e.message }),
            );
            sent += 1;
            if (got.status !== 200) dropped.push(`write via the coordinator: ${got.status} ${got.text}`);
          }
        })(),
        (async () => {
          while (reloading) {
            const got = await proxyAs(client1, "client1").catch((e: Error) => ({ status: 0, text: e.message }));
            sent += 1;
            if (got.status !== 200) dropped.push(`client1 through the proxy: ${got.status} ${got.text}`);
          }
        })(),
      ]);
      const m = await measureUntil("revocation of client-live", () => runPkiSh(pki, "revoke", "client-live"), {
        "proof via the coordinator": async () => (await write(liveSigner, client2)).status === 401,
        "proof at server 1": async () => (await write(liveSigner, client2, { at: server1 })).status === 401,
        "proof at server 2": async () => (await write(liveSigner, client2, { at: server2 })).status === 401,
        "TLS to the coordinator": refusedAt(t.coordinator),
        "TLS to server 1": refusedAt(server1),
        "TLS to the KeyServer": refusedAt(stack.keyserver),
        "TLS to the SecureProxy": refusedAt(stack.secureproxy),
        "GET /health on a kept connection to server 1": keptRefused(kept[0]!.socket),
        "GET /health on a kept connection to the coordinator": keptRefused(kept[1]!.socket),
      });
      for (const { socket } of kept) socket.destroy();
      // The roles poll their files every second: a little longer, and every role has reloaded under the traffic.
      await waitFor(
        "every role to log its TLS reload",
        () =>
          ["server1", "server2", "coordinator", "keyserver", "secureproxy"].every((r) =>
            cluster.role(r).lines.some((l) => l.startsWith(`TLS material reloaded: ${revokedCount(pki)} revoked`)),
          ),
        5000,
      ).catch(() => {});
      reloading = false;
      await traffic;
      measurements.push(m);
      tally.notes.push(
        `M1: during the revocation's reloads, ${sent} requests of client1's (writes via the coordinator, calls through the proxy): ${dropped.length} failed`,
      );
      if (m.ms === null || m.ms > RELOAD_BOUND_MS) return describeMeasurement(m);
      return dropped.length === 0 ? null : `${dropped.length} of client1's ${sent} requests failed during the reloads: ${dropped[0]}`;
    },
  );

  // ---- Policy edits take effect live, at every role that decides. Old: there was no policy.
  await tally.run(
    "all",
    `policy edit: client2's records.write and proxy.use removed live → 403 within ${RELOAD_BOUND_MS / 1000} s, restored after`,
    1,
    async () => {
      const allowed = (permission: string) => (r: Rule) => (r.identity === ids.client2 ? { ...r, allow: r.allow.filter((p) => p !== permission) } : r);
      const edited = t.rules.map(allowed("records.write")).map(allowed("proxy.use:client2/marketplace"));
      const checks = (status: number) => ({
        "write via the coordinator": async () => (await write(signer("client2"), client2)).status === status,
        "write at server 1": async () => (await write(signer("client2"), client2, { at: server1 })).status === status,
        "write at server 2": async () => (await write(signer("client2"), client2, { at: server2 })).status === status,
        "proxy.use at the SecureProxy": async () => (await proxyAs(client2, "client2")).status === status,
        "proxy.use at the KeyServer": async () => (await keyserverAs(proxyTls, ids.client2, "client2")).status === status,
      });
      // This case is about the policy: it starts once the coordinator has both servers in rotation again.
      await Promise.all(t.servers.map((server) => waitUntilInRotation(cluster, t.coordinator, server, 10_000)));
      for (const [name, check] of Object.entries(checks(200))) if (!(await check())) return `before the edit, ${name} was not allowed`;
      const removed = await measureUntil(
        "policy edit (client2's records.write and proxy.use:client2/marketplace removed)",
        () => writePolicy(t.policyFile, edited),
        checks(403),
      );
      const restored = await measureUntil("policy restored", () => writePolicy(t.policyFile, t.rules), checks(200));
      measurements.push(removed, restored);
      const late = [removed, restored].filter((m) => m.ms === null || m.ms > RELOAD_BOUND_MS);
      return late.length === 0 ? null : late.map(describeMeasurement).join("; ");
    },
  );

  return measurements;
}

/** How many certificates the PKI's CRL lists now. */
function revokedCount(pki: string): number {
  return parseCrl(readFileSync(join(pki, "crl.pem"), "utf8"), readFileSync(join(pki, "ca_cert.pem"), "utf8")).revoked.size;
}

/**
 * A POST promising 1000 bytes of body, with 5 of them sent once the role is reading the body: its "100 Continue"
 * (both node:http and Bun.serve send one for Expect: 100-continue) says it got that far.
 */
async function startBody(url: string, material: TlsMaterial, path: string) {
  const socket = await connectTls(url, material);
  socket.on("error", () => {});
  const reading = new Promise<boolean>((resolve) => {
    const timer = setTimeout(() => resolve(false), 5000);
    socket.once("data", (chunk: Buffer) => {
      clearTimeout(timer);
      resolve(chunk.toString("latin1").startsWith("HTTP/1.1 100"));
    });
  });
  socket.write(`POST ${path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 1000\r\nExpect: 100-continue\r\n\r\n`);
  if (!(await reading)) throw new Error(`no 100 Continue from ${url}${path}: the role did not start reading the body`);
  socket.write('{"a":');
  return socket;
}

/**
 * The cases that wait for a deadline, run side by side: headers dribbled one byte a second (M2, ~10 s), and a body
 * stalled after 5 of 1000 bytes (H2: the idle timeout, at most the 30 s body deadline). Afterwards every role answers.
 */
export async function runSlowFindingCases(t: Pick<FindingTargets, "cluster" | "coordinator" | "servers" | "stack">, tally: Tally): Promise<void> {
  const client1 = mutualTlsClientOptions(loadIdentity(t.cluster.pki, "client1"));
  const all: [string, string][] = [
    ["server1", t.servers[0]],
    ["coordinator", t.coordinator],
    ["keyserver", t.stack.keyserver],
    ["secureproxy", t.stack.secureproxy],
  ];
  await Promise.all([
    // Old: the KeyServer kept such a connection for more than 100 s; its idle timer restarted with every byte.
    // On Bun, the Bun.serve behind every role's TLS gate closes it at its idle timeout (~12 s); the node listener
    // (every role on Deno) at its 10 s header deadline.
    ...all.map(([role, url]) =>
      tally.run(role, "M2: headers dribbled one byte a second → closed within 14 s", 1, async () => {
        const after = await dribbleClosedAfter(url, client1, 1000, 20_000);
        tally.notes.push(
          `M2: ${role} closed a connection dribbling one header byte a second after ${after === null ? "more than 20 s" : `${(after / 1000).toFixed(1)} s`}`,
        );
        return after !== null && after <= 14_000 ? null : after === null ? "still open after 20 s" : `closed after ${(after / 1000).toFixed(1)} s`;
      }),
    ),
    // Old: a stalled body on the KeyServer ended in an unhandled rejection when the idle timer fired.
    ...all.map(([role, url]) =>
      tally.run(role, "H2: a body stalled after 5 of 1000 bytes → closed, role still up", 1, async () => {
        const path = role === "secureproxy" ? "/request_api" : role === "keyserver" ? "/" : "/api/data";
        const socket = await startBody(url, client1, path);
        const closed = await closedWithin(socket, 40_000); // the node listener's body deadline is 30 s
        socket.destroy();
        if (closed === null) return "still open after 40 s";
        const health = await t.cluster.health(url);
        return health?.status === 200 && t.cluster.role(role).running ? null : `${role} /health afterwards: ${health?.status ?? "no answer"}`;
      }),
    ),
  ]);
}

/**
 * M2's and L2's per-identity cap: `cap + extra` idle TLS connections of client1; the role closes the extra ones and
 * keeps the rest, and serves again once they are gone. Run it alone: every connection of client1 counts.
 */
export async function runConnectionCapCase(
  t: Pick<FindingTargets, "cluster" | "stack" | "coordinator" | "servers">,
  tally: Tally,
  cap: number,
  extra = 5,
): Promise<void> {
  const client1 = mutualTlsClientOptions(loadIdentity(t.cluster.pki, "client1"));
  // Issue 18, L2: client2 held 300 connections open on the coordinator and on each server (Bun.serve could not tell
  // who held them); every role now caps each identity, on both runtimes.
  const roles = [
    ["keyserver", t.stack.keyserver],
    ["secureproxy", t.stack.secureproxy],
    ["coordinator", t.coordinator],
    ["server1", t.servers[0]],
  ] as const;
  for (const [role, url] of roles) {
    await tally.run(role, `M2: ${cap + extra} idle connections of one identity → those over the cap of ${cap} closed`, 1, async () => {
      const sockets = (await Promise.all(Array.from({ length: cap + extra }, () => connectTls(url, client1).catch(() => null)))).filter((s) => s !== null);
      try {
        for (const s of sockets) s.on("error", () => {});
        const closedCount = () => cap + extra - sockets.length + sockets.filter((s) => s.destroyed || s.closed).length;
        await waitFor(`${extra} of ${role}'s connections to be closed`, () => closedCount() >= extra, 5000).catch(() => {});
        // This process holds a few keep-alive connections of its own from the same address (fetch's pool), so
        // slightly more than `extra` may go; but no more than the cap stay, and not far fewer.
        const open = cap + extra - closedCount();
        tally.notes.push(
          `M2: ${role} kept ${open} of ${cap + extra} idle connections of client1 (cap ${cap} per identity; this process held a few more of its own)`,
        );
        if (open > cap || open < cap - 8) return `${open} of ${cap + extra} stayed open, wanted at most ${cap} and at least ${cap - 8}`;
      } finally {
        for (const s of sockets) s.destroy();
      }
      // Once they are gone, the address is served again.
      await waitFor(`${role} to serve 127.0.0.1 again`, async () => (await t.cluster.health(url))?.status === 200, 5000).catch(() => {});
      return (await t.cluster.health(url))?.status === 200 ? null : `${role} does not serve again after the connections closed`;
    });
  }
}

export function measurementLines(measurements: Measurement[]): string[] {
  return measurements.map(describeMeasurement);
}
