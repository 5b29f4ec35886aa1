// The finding cases of #11 (H1, H2, M1–M5, L1–L8, hardening) and issue 18, one table per finding: each group
// returns its cases, and runFindingCases() runs every table against real processes, for `bun harness security` and
// harness/security.test.ts. Each case says, in a comment, what the old code (39504b0) did instead, so it fails there.
import { createPublicKey, randomUUID, type KeyObject } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import type tls from "node:tls";
import { parseCrl } from "../shared/authz/crl.ts";
import type { Rule } from "../shared/authz/policy.ts";
import { loadFernetKeys } from "../shared/platform/config.ts";
import { Fernet } from "../shared/request-path/fernet.ts";
import type { DataSnapshot } from "../shared/request-path/data-view.ts";
import { PROOF_HEADER, ProofSigner } from "../shared/request-path/proof.ts";
import { loadIdentity, mutualTlsClientOptions, type Identity } from "../shared/platform/tls.ts";
import { ON_BEHALF_OF_HEADER, openJoseResponse, prepareJoseRequest, prepareLegacyRequest } from "../shared/token-path/token-exchange.ts";
import { freePort, runPkiSh, waitFor, waitUntilInRotation } from "./fixtures/index.ts";
import { closedWithin, connectTls, parseHttpAnswer, plainHttp, sendChunked, startImpostor, tlsRefused, type Tally, type TlsMaterial } from "./hostile.ts";
import {
  describeMeasurement,
  FORGED_MARKER,
  measureUntil,
  RELOAD_BOUND_MS,
  SPIFFE,
  startBody,
  writePolicy,
  type FindingOptions,
  type Json,
  type FindingTargets,
  type Measurement,
} from "./findings.ts";

/** One case of a finding: the role it is about, what it checks, how many runs, and the check (null when it held). */
export interface FindingCase {
  role: string;
  title: string;
  times: number;
  run: () => Promise<string | null>;
}

const finding = (role: string, title: string, times: number, run: () => Promise<string | null>): FindingCase => ({ role, title, times, run });

/** What every case works with: the targets, each identity's TLS and proof signer, and the requests the cases send. */
export type FindingKit = ReturnType<typeof findingKit>;

function findingKit(t: FindingTargets, tally: Tally, options: FindingOptions) {
  /** Lines for the summary, besides the cases' own. */
  const notes = tally.notes;
  const full = options.full;
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
  /** The KeyServer's RSA public key, fetched once (roles started with its --data share it). */
  const keyserverPublicKey = async () =>
    (keyserverKey ??= createPublicKey(((await (await call(`${stack.keyserver}/public_key`, proxyTls)).json()) as { public_key: string }).public_key));
  /** A JOSE token request straight to the KeyServer over `tls`, naming `onBehalfOf`; 200 only when the token opens. */
  const keyserverAs = async (tls: TlsMaterial, onBehalfOf: string | null, clientId = "client1", tokenType = "marketplace") => {
    const prepared = await prepareJoseRequest(await keyserverPublicKey(), clientId, tokenType);
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

  return {
    notes,
    cluster,
    stack,
    pki,
    server1,
    server2,
    tlsOf,
    signer,
    signerOf,
    fernet,
    client1,
    client2,
    proxyTls,
    coordinatorTls,
    n,
    measurements,
    call,
    postJson,
    answer,
    write,
    expectStatus,
    forbidden,
    itemUri,
    proxyAs,
    keyserverPublicKey,
    keyserverAs,
    healthy,
    auditLines,
    waitForAudit,
    roles,
    ids,
    t,
    full,
  };
}

/** H1: the proxy knows who calls it. Old: ClientId came from the body, client2 and the coordinator got 200. */
function proxyKnowsItsCaller(kit: FindingKit): FindingCase[] {
  const { tlsOf, client1, client2, proxyTls, n, expectStatus, forbidden, proxyAs, keyserverAs, auditLines } = kit;
  const { waitForAudit, ids } = kit;
  return [
    finding("secureproxy", "H1: client2 asks for ClientId client1's token → 403", n, async () =>
      expectStatus(await proxyAs(client2, "client1"), 403, forbidden(ids.client2, "proxy.use:client1/marketplace")),
    ),
    finding("secureproxy", "H1: the coordinator's certificate asks for client1's token → 403", n, async () =>
      expectStatus(await proxyAs(tlsOf("coordinator"), "client1"), 403, forbidden(ids.coordinator, "proxy.use:client1/marketplace")),
    ),
    // Old: the audit line said caller=secureproxy client=client1; the original caller was recorded nowhere.
    finding("keyserver", "H1: the KeyServer's audit names the proxy and the original caller", n, async () => {
      const line = new RegExp(`^AUDIT .*caller=${ids.secureproxy} on_behalf_of=${ids.client1} client=client1 type=marketplace outcome=released`);
      const before = auditLines(line);
      const ok = await proxyAs(client1, "client1");
      if (ok.status !== 200) return `client1 through the proxy: ${ok.status} ${ok.text}`;
      return waitForAudit(line, before);
    }),
    // Defence in depth: even the proxy's own certificate cannot get client1's token for client2.
    finding("keyserver", "H1: the proxy's certificate on behalf of client2 for client1's token → 403, audited", n, async () => {
      const line = new RegExp(`^AUDIT .*caller=${ids.secureproxy} on_behalf_of=${ids.client2} client=client1 type=marketplace outcome=forbidden`);
      const before = auditLines(line);
      const problem = expectStatus(await keyserverAs(proxyTls, ids.client2), 403, forbidden(ids.client2, "proxy.use:client1/marketplace"));
      return problem ?? waitForAudit(line, before);
    }),
  ];
}

/** H2: an aborted body never stops a role. Old: the KeyServer's node:https listener died on "aborted"/ECONNRESET. */
function abortedBodies({ client1, n, healthy, roles }: FindingKit): FindingCase[] {
  return [
    ...roles.flatMap(([role, url]) => {
      const path = role === "secureproxy" ? "/request_api" : role === "keyserver" ? "/" : "/api/data";
      return [
        finding(role, "H2: a body declared 1000 bytes, 5 sent, then close", n, async () => {
          const socket = await startBody(url, client1, path);
          socket.end();
          await closedWithin(socket, 5000);
          socket.destroy();
          return healthy(url, role);
        }),
        finding(role, "H2: a body declared 1000 bytes, 5 sent, then a reset", n, async () => {
          const socket = await startBody(url, client1, path);
          socket.resetAndDestroy();
          return healthy(url, role);
        }),
      ];
    }),
  ];
}

/** M1: proofs are checked against the CRL. Old: a revoked certificate's proof over client2's TLS was stored, 200. */
function proofsCheckedAgainstCrl({ signerOf, client2, n, write, expectStatus, t }: FindingKit): FindingCase[] {
  const revoked = t.hostileCerts.revoked!;
  return [
    finding("server", "M1: a proof signed by a revoked certificate, over client2's TLS → 401", n, async () =>
      expectStatus(await write(signerOf(revoked), client2), 401, "revoked"),
    ),
  ];
}

/** M5: reads need a proof, and view.read:own sees only its own. Old: get_cached_data needed nothing. */
function readsNeedProof({ tlsOf, signer, fernet, client1, n, call, answer, write, expectStatus, t }: FindingKit): FindingCase[] {
  return [
    finding("server", "M5: a read without a proof → 401", n, async () =>
      expectStatus(await answer(await call(`${t.coordinator}/api/get_cached_data`, client1)), 401),
    ),
    finding("server", "M5: view.read:own (client-own) sees only its own records", 1, async () => {
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
    }),
  ];
}

/** L1: no forged log lines. Old: the coordinator logged a server's "unexpected field: <name>" raw. */
function noForgedLogLines({ stack, signer, client1, proxyTls, n, postJson, answer, expectStatus, itemUri, t }: FindingKit): FindingCase[] {
  // Escapes first: a role that shortens the echoed name still echoes them.
  const evilName = `\u001b[2J\u001b]0;pwned\u0007\n127.0.0.1 - - [01/Jan/2030 00:00:00] "POST /${FORGED_MARKER} HTTP/1.1" 200 -\nServer https://127.0.0.1:1 is back in rotation ${FORGED_MARKER}`;
  return [
    finding("coordinator", "L1: a field name with a newline, a fake access line and escapes (invalidate)", n, async () => {
      const proof = await signer("client1").sign({ method: "POST", path: "/api/invalidate_cache", payload: "" });
      return expectStatus(await answer(await postJson(`${t.coordinator}/api/invalidate_cache`, client1, { proof, [evilName]: 1 })), 400);
    }),
    finding("coordinator", "L1: the same field name in a write", n, async () =>
      expectStatus(await answer(await postJson(`${t.coordinator}/api/data`, client1, { data: "x", proof: "y", [evilName]: 1 })), 400),
    ),
    finding("keyserver", "L1: the same field name in a token request", n, async () =>
      expectStatus(
        await answer(await postJson(`${stack.keyserver}/`, proxyTls, { sessionKey: "a", clientId: "client1", tokenType: "marketplace", [evilName]: 1 })),
        400,
      ),
    ),
    finding("secureproxy", "L1: the same field name, and in ClientId", n, async () => {
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
    }),
    // (scanLogs checks afterwards that no log line starts with the forged text and no log holds an escape sequence.)
  ];
}

/** L2: the coordinator logs and counts the upstream's status. Old: every answer was logged and counted 200. */
function upstreamStatusCounted({ cluster, tlsOf, signer, fernet, client1, postJson, answer, write, t }: FindingKit): FindingCase[] {
  return [
    finding("coordinator", "L2: a 401 and a 403 from the servers are logged and counted as 401 and 403", 1, async () => {
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
    }),
  ];
}

/** L3: invalidation proofs are single-use and live 60 s + skew. Old: one proof worked 5 times, and 75 s later. */
function invalidationProofsSingleUse({ signer, client1, n, postJson, answer, t }: FindingKit): FindingCase[] {
  return [
    finding("server", "L3: an invalidation proof replayed through the coordinator → every server refuses", n, async () => {
      const body = { proof: await signer("client1").sign({ method: "POST", path: "/api/invalidate_cache", payload: "" }) };
      const first = await answer(await postJson(`${t.coordinator}/api/invalidate_cache`, client1, body));
      if (first.status !== 200 || (first.body.acknowledged as unknown[]).length !== 2) return `first use: ${first.status} ${first.text}`;
      const again = await answer(await postJson(`${t.coordinator}/api/invalidate_cache`, client1, body));
      const failed = (again.body.failed ?? []) as { status: number }[];
      return again.status === 401 && (again.body.acknowledged as unknown[]).length === 0 && failed.length === 2 && failed.every((f) => f.status === 401)
        ? null
        : `replay: ${again.status} ${again.text}`;
    }),
    finding("server", "L3: an invalidation proof signed 75 s ago → refused", n, async () => {
      const proof = await signer("client1").sign({ method: "POST", path: "/api/invalidate_cache", payload: "" }, Date.now() / 1000 - 75);
      const stale = await answer(await postJson(`${t.coordinator}/api/invalidate_cache`, client1, { proof }));
      return stale.status === 401 && (stale.body.acknowledged as unknown[]).length === 0 ? null : `${stale.status} ${stale.text}`;
    }),
  ];
}

/** L4: only clients write, only through the coordinator. Old: any clientAuth certificate wrote, to any server. */
function onlyClientsWrite(kit: FindingKit): FindingCase[] {
  const { server1, server2, tlsOf, signer, fernet, client1, client2, proxyTls, n, postJson, answer, write } = kit;
  const { expectStatus, forbidden, ids } = kit;
  return [
    finding("server", "L4: the coordinator's proof cannot write → 403", n, async () =>
      expectStatus(await write(signer("coordinator"), tlsOf("coordinator")), 403, forbidden(ids.coordinator, "records.write")),
    ),
    finding("server", "L4: the secureproxy's proof cannot write → 403", n, async () =>
      expectStatus(await write(signer("secureproxy"), proxyTls), 403, forbidden(ids.secureproxy, "records.write")),
    ),
    finding("server", "L4: client1 calling a server directly, with its own valid proof → 403 (its certificate lacks forward)", n, async () => {
      const data = fernet.encrypt("direct");
      const proof = await signer("client1").sign({ method: "POST", path: "/api/data", payload: data });
      return expectStatus(await answer(await postJson(`${server1}/api/data`, client1, { data, proof })), 403, forbidden(ids.client1, "forward"));
    }),
    // Issue 18 H1: a forwarded request carried a bearer forwarder assertion; captured by an impostor, it let client2's
    // TLS write at server 1 (200). Now whatever a forwarded request carries opens nothing without the coordinator's
    // own connection: the whole request as the coordinator sends it, replayed over client2's TLS, at every server.
    ...(
      [
        ["server1", server1],
        ["server2", server2],
      ] as const
    ).flatMap(([name, url]) => {
      return [
        finding(name, "H1: a request as the coordinator forwards it, replayed over client2's TLS → 403", n, async () => {
          const data = fernet.encrypt("captured on its way to a server");
          const proof = await signer("client1").sign({ method: "POST", path: "/api/data", payload: data });
          const headers = { "idempotency-key": randomUUID(), traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" };
          return expectStatus(await answer(await postJson(`${url}/api/data`, client2, { data, proof }, headers)), 403, forbidden(ids.client2, "forward"));
        }),
      ];
    }),
  ];
}

/** L5: idempotency keys belong to their sender. Old: client1 got client2's record id, or 409. */
function idempotencyKeysPerSender({ signer, fernet, client1, client2, n, write }: FindingKit): FindingCase[] {
  return [
    finding("server", "L5: client1 reusing client2's Idempotency-Key gets a record of its own", n, async () => {
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
    }),
  ];
}

/** L6: the body limit counts bytes read. Old: a 201,387-byte chunked body was stored. */
function bodyLimitCountsBytes({ stack, server1, client1, proxyTls, coordinatorTls, n, t }: FindingKit): FindingCase[] {
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
  return [
    ...chunkedTargets.flatMap(([role, url, path, tls]) => {
      return [
        finding(role, "L6: a 201,387-byte chunked body → 413 JSON", n, async () => {
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
        }),
      ];
    }),
  ];
}

/** L7: the client prints others' text through printable(). Old: client2's text cleared client1's screen. */
function clientOutputEscaped({ cluster, signer, fernet, client2, write, t }: FindingKit): FindingCase[] {
  return [
    finding("client", "L7: client1's output after client2 stored escape sequences has no ESC byte", 1, async () => {
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
    }),
  ];
}

/** L8: the original format needs a timestamp and nonce. Old: the same body was released 3 times. */
function originalFormatNeedsNonce({ stack, proxyTls, n, postJson, answer, keyserverPublicKey, ids }: FindingKit): FindingCase[] {
  return [
    finding("keyserver", "L8: original format without timestamp and nonce → refused", Math.max(n, 3), async () => {
      const { body } = await prepareLegacyRequest(await keyserverPublicKey(), "client1", "marketplace");
      const { timestamp: _t, nonce: _n, ...bare } = JSON.parse(body) as Json;
      const got = await answer(await postJson(`${stack.keyserver}/`, proxyTls, bare, { [ON_BEHALF_OF_HEADER]: ids.client1 }));
      return got.status === 401 && got.body.code === "ERR_REPLAY" ? null : `${got.status} ${got.text}`;
    }),
    finding("keyserver", "L8: original format, the same nonce twice → the second refused", n, async () => {
      const { body } = await prepareLegacyRequest(await keyserverPublicKey(), "client1", "marketplace");
      const headers = { [ON_BEHALF_OF_HEADER]: ids.client1 };
      const first = await answer(await postJson(`${stack.keyserver}/`, proxyTls, body, headers));
      if (first.status !== 200) return `first: ${first.status} ${first.text}`;
      const second = await answer(await postJson(`${stack.keyserver}/`, proxyTls, body, headers));
      return second.status === 401 && second.body.code === "ERR_REPLAY" ? null : `second: ${second.status} ${second.text}`;
    }),
  ];
}

/** Hardening: the admin listener checks Host (DNS rebinding). Old: any Host was served. */
function adminListenerChecksHost({ n, t }: FindingKit): FindingCase[] {
  return [
    finding("coordinator", "Hardening: admin listener with Host: evil.example → refused", n, async () => {
      const raw = parseHttpAnswer(await plainHttp(t.admin, "GET /status HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"));
      return raw && raw.status >= 400 && raw.status < 500 && !raw.body.includes("serversUp")
        ? null
        : `answered ${raw ? `${raw.status} ${raw.body.slice(0, 80)}` : "nothing"}`;
    }),
    finding("coordinator", "Hardening: admin listener with Host: 127.0.0.1:<port> → served", n, async () => {
      const raw = parseHttpAnswer(await plainHttp(t.admin, `GET /status HTTP/1.1\r\nHost: ${new URL(t.admin).host}\r\nConnection: close\r\n\r\n`));
      return raw?.status === 200 && raw.body.includes("serversUp") ? null : `answered ${raw ? `${raw.status} ${raw.body.slice(0, 80)}` : "nothing"}`;
    }),
  ];
}

/** Hardening: every hop checks whom it reached. Old: any certificate of the CA passed as a server or a KeyServer. */
function everyHopChecksIdentity({ cluster, stack, server1, signer, client1, postJson, answer, write, itemUri }: FindingKit): FindingCase[] {
  const unexpectedPeer = /UNEXPECTED_PEER.*expected spiffe:\/\/securemesh\/server\/\*/;
  return [
    finding("coordinator", "Hardening: \"servers\" presenting the KeyServer's and the proxy's identities: refused, nothing forwarded", 1, async () => {
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
    }),
    finding("secureproxy", 'Hardening: a "KeyServer" presenting a server identity is refused, nothing sent', 1, async () => {
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
    }),
  ];
}

/** Issue 18: every outbound hop pins an identity. Before, the API hop trusted any mesh certificate naming the API's host (M1: a server certificate on :5005 was handed client1's token), and a client any one on the coordinator's port. */
function everyOutboundHopPinned({ cluster, stack, pki, client1, postJson, answer }: FindingKit): FindingCase[] {
  return [
    finding("secureproxy", "M1: a server certificate on the API's allowlisted port gets no token; nothing sent", 1, async () => {
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
          await postJson(`${url}/request_api`, client1, {
            ClientId: "client1",
            TokenType: "marketplace",
            ApiUri: `https://127.0.0.1:${impostor.port}/api/item`,
          }),
        );
        if (got.status !== 502 || !/unexpected peer identity|UNEXPECTED_PEER|expected spiffe:\/\/securemesh\/marketplace\/marketplace/.test(got.text))
          return `answered ${got.status}: ${got.text}`;
        return impostor.bytes === 0 ? null : `the impostor received ${impostor.bytes} bytes`;
      } finally {
        await cluster.kill("refuses-api-secureproxy");
      }
    }),
    finding("client", "H1: a server certificate on a coordinator's port gets nothing from a client", 1, async () => {
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
    }),
  ];
}

/** M3 and M4 start processes of their own: only in the harness's full run (bun test covers both elsewhere). */
function ownProcesses({ cluster, stack, client1, proxyTls, call, proxyAs, keyserverPublicKey, ids, t, full }: FindingKit): FindingCase[] {
  if (!full) return [];
  return [
    // Old: one global nonce store; client2 filling it got client1 503 ERR_REPLAY_MEMORY_FULL.
    finding("keyserver", "M3: client2 exhausting its nonce quota (3 here) does not stop client1", 1, async () => {
      const url = await cluster.startRole("keyserver-quota", "keyserver", ["0", "--data", stack.dataDir, "--db", t.tokenDb, "--replay-quota", "3"]);
      try {
        const ask = async (onBehalfOf: string, clientId: string) => {
          const prepared = await prepareJoseRequest(
            await keyserverPublicKey(), // the same --data: the same key
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
    }),
    // Old: after rotate-key every proxy call got 502 until the KeyServer restarted.
    finding("keyserver", "M4: token rotate-key while releases run → 0 failed releases", 1, async () => {
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
    }),
  ];
}

/** M1, live: ./pki.sh revoke with the roles running. Old: the CRL was read only at start. */
function liveRevocation(kit: FindingKit): FindingCase[] {
  const { notes, cluster, stack, pki, server1, server2, tlsOf, signer, fernet, client1, client2, measurements } = kit;
  const { write, proxyAs, roles, t } = kit;
  return [
    finding("all", `M1: ./pki.sh revoke client-live with the roles running → its proofs and TLS refused within ${RELOAD_BOUND_MS / 1000} s`, 1, async () => {
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
      notes.push(
        `M1: during the revocation's reloads, ${sent} requests of client1's (writes via the coordinator, calls through the proxy): ${dropped.length} failed`,
      );
      if (m.ms === null || m.ms > RELOAD_BOUND_MS) return describeMeasurement(m);
      return dropped.length === 0 ? null : `${dropped.length} of client1's ${sent} requests failed during the reloads: ${dropped[0]}`;
    }),
  ];
}

/** Policy edits take effect live, at every role that decides. Old: there was no policy. */
function livePolicyEdit(kit: FindingKit): FindingCase[] {
  const { cluster, server1, server2, signer, client2, proxyTls, measurements, write, proxyAs, keyserverAs } = kit;
  const { ids, t } = kit;
  return [
    finding("all", `policy edit: client2's records.write and proxy.use removed live → 403 within ${RELOAD_BOUND_MS / 1000} s, restored after`, 1, async () => {
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
    }),
  ];
}

/** Every finding's table, in the order they run: the live revocation and policy edit last, as they change the mesh. */
export const FINDING_GROUPS: readonly ((kit: FindingKit) => FindingCase[])[] = [
  proxyKnowsItsCaller,
  abortedBodies,
  proofsCheckedAgainstCrl,
  readsNeedProof,
  noForgedLogLines,
  upstreamStatusCounted,
  invalidationProofsSingleUse,
  onlyClientsWrite,
  idempotencyKeysPerSender,
  bodyLimitCountsBytes,
  clientOutputEscaped,
  originalFormatNeedsNonce,
  adminListenerChecksHost,
  everyHopChecksIdentity,
  everyOutboundHopPinned,
  ownProcesses,
  liveRevocation,
  livePolicyEdit,
];

/** Runs every finding case into `tally`; returns the measured reload times, for the summary. */
export async function runFindingCases(t: FindingTargets, tally: Tally, options: FindingOptions): Promise<Measurement[]> {
  const kit = findingKit(t, tally, options);
  for (const group of FINDING_GROUPS) {
    // A group's table is made just before it runs: what it reads from the targets (a revoked certificate) is current.
    for (const { role, title, times, run } of group(kit)) await tally.run(role, title, times, run);
  }
  return kit.measurements;
}

/** How many certificates the PKI's CRL lists now. */
function revokedCount(pki: string): number {
  return parseCrl(readFileSync(join(pki, "crl.pem"), "utf8"), readFileSync(join(pki, "ca_cert.pem"), "utf8")).revoked.size;
}
