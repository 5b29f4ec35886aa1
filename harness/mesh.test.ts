// Integration tests: real role processes on free ports, real mutual TLS, a real sqlite file. The cases a runtime
// could get wrong (the handshake, the CRL, error codes behind failover, the environment guard) run with the roles on
// Bun and on Deno; failover once more with the two mixed.
import { beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { loadFernetKeys } from "../shared/platform/config.ts";
import { Fernet } from "../shared/request-path/fernet.ts";
import { ProofSigner } from "../shared/request-path/proof.ts";
import { openStore } from "../shared/request-path/store.ts";
import { runPython } from "../shared/testing/python.ts";
import { loadIdentity, mutualTlsClientOptions } from "../shared/platform/tls.ts";
import { revocationPki, roleCommand, startMesh, testPki, waitFor } from "./fixtures/index.ts";

setDefaultTimeout(30_000);

/** The runtimes every runtime-sensitive case runs its roles on. */
const RUNTIMES = ["bun", "deno"] as const;

let pki: string;
let otherPki: string;
/** A PKI whose client `x` is revoked, on the CRL the roles load at start. */
let revokedPki: string;

beforeAll(async () => {
  [pki, otherPki, revokedPki] = await Promise.all([testPki("main"), testPki("other"), revocationPki("mesh").then((r) => r.dir)]);
});

async function fetchStatus(url: string, tls: object): Promise<number | string> {
  try {
    const response = await fetch(url, { tls, signal: AbortSignal.timeout(5000) } as RequestInit);
    const body = await response.text();
    return response.status === 200 ? 200 : `${response.status} ${(JSON.parse(body) as { code?: string }).code}`;
  } catch (error) {
    return (error as { code?: string }).code ?? "error";
  }
}

describe.each(RUNTIMES)("mutual TLS, roles on %s", (runtime) => {
  test("valid client certificates are accepted; none or another CA's fail the handshake; a revoked one is told so", async () => {
    await using mesh = await startMesh({ pki: revokedPki, runtime });
    const ca = readFileSync(join(revokedPki, "ca_cert.pem"), "utf8");
    const valid = mutualTlsClientOptions(loadIdentity(revokedPki, "client1"));
    const foreign = { ...mutualTlsClientOptions(loadIdentity(otherPki, "client1")), ca };
    const revoked = mutualTlsClientOptions(loadIdentity(revokedPki, "x"));
    for (const url of [mesh.coordinator, mesh.servers[0]!.url]) {
      expect(await fetchStatus(`${url}/health`, valid)).toBe(200);
      // Refused before any HTTP: the fetch fails with a connection error rather than getting a status, on both runtimes.
      for (const refused of [{ ca }, foreign]) expect(await fetchStatus(`${url}/health`, refused)).not.toStartWith("200");
      // Refused by the listener, which says why, rather than a reset that looks like a network fault (issue 23).
      expect(await fetchStatus(`${url}/health`, revoked)).toBe("403 ERR_REVOKED");
    }
  });

  test("issue 23: a revoked client is told so, and the coordinator logs whom it refused", async () => {
    await using mesh = await startMesh({ pki: revokedPki, runtime });
    const run = await mesh.cluster.runClient("client-x", ["--name", "x", "--coordinator", mesh.coordinator, "--no-cache-check"]);
    expect(run.exitCode).toBe(1);
    expect(run.lines.join("\n")).toContain("[x] Error 403: this client's certificate is revoked (spiffe://securemesh/client/x, serial");
    await mesh.cluster.role("coordinator").waitForLine(/refused: spiffe:\/\/securemesh\/client\/x's certificate is revoked/);
  });

  test("curl, a client no one here wrote, gets in with a certificate and not without, nor with a revoked one", async () => {
    await using mesh = await startMesh({ pki: revokedPki, runtime });
    const port = new URL(mesh.coordinator).port;
    const curl = async (...args: string[]) => {
      await using proc = Bun.spawn(
        ["curl", "-sS", "--max-time", "5", "--cacert", join(revokedPki, "ca_cert.pem"), ...args, `https://localhost:${port}/health`],
        { stdout: "pipe", stderr: "pipe" },
      );
      const [stdout, exitCode] = await Promise.all([new Response(proc.stdout).text(), proc.exited]);
      return { exitCode, stdout };
    };
    const as = (dir: string, name: string) => ["--cert", join(dir, `${name}_cert.pem`), "--key", join(dir, `${name}_key.pem`)];
    const ok = await curl(...as(revokedPki, "client1"));
    expect(ok.exitCode).toBe(0);
    expect(JSON.parse(ok.stdout)).toMatchObject({ status: "ok", role: "coordinator", serversUp: 2 });
    expect((await curl()).exitCode).not.toBe(0);
    expect((await curl(...as(otherPki, "client1"))).exitCode).not.toBe(0);
    const revoked = await curl(...as(revokedPki, "x"));
    expect(JSON.parse(revoked.stdout)).toMatchObject({ code: "ERR_REVOKED" });
  });
});

describe("request path", () => {
  test("a Python client sends a Python-made Fernet token with a valid proof; a server logs the plaintext", async () => {
    await using mesh = await startMesh({ pki });
    const { cluster, coordinator } = mesh;
    const key = loadFernetKeys(pki)[0]!;
    const token = await runPython(
      `from cryptography.fernet import Fernet\nprint(Fernet(${JSON.stringify(key)}.encode()).encrypt("from python requests".encode()).decode())`,
    );
    const proof = await new ProofSigner(loadIdentity(pki, "client2")).sign({ method: "POST", path: "/api/data", payload: token });
    const out = await runPython(
      `
import json, os, requests
r = requests.post(os.environ["URL"] + "/api/data", json={"data": os.environ["TOKEN"], "proof": os.environ["PROOF"]},
                  cert=(os.environ["CERT"], os.environ["KEY"]), verify=os.environ["CA"], timeout=10)
print(json.dumps({"status": r.status_code, "body": r.json()}))`,
      "",
      {
        URL: coordinator,
        TOKEN: token,
        PROOF: proof,
        CERT: join(pki, "client2_cert.pem"),
        KEY: join(pki, "client2_key.pem"),
        CA: join(pki, "ca_cert.pem"),
      },
    );
    const { status, body } = JSON.parse(out);
    expect(status).toBe(200);
    expect(body).toMatchObject({ result: "ok" });
    const logged = await Promise.race(["server1", "server2"].map((n) => cluster.role(n).waitForLine(/Decrypted data: from python requests \(from client2\)/)));
    expect(logged).toBe("Decrypted data: from python requests (from client2)");
  });

  test("the sender proof is accepted, then refused when forged, expired or replayed", async () => {
    await using mesh = await startMesh({ pki });
    const client = mesh.client();
    const signer = new ProofSigner(loadIdentity(pki, "client1"));
    const forger = new ProofSigner(loadIdentity(otherPki, "client1"));
    const token = new Fernet(loadFernetKeys(pki)).encrypt("proof test");
    const target = { method: "POST", path: "/api/data", payload: token };
    const post = (proof: string) => client.request("POST", "/api/data", { data: token, proof });

    const good = await signer.sign(target);
    expect((await post(good)).status).toBe(200);
    expect(await post(good)).toMatchObject({ status: 401, body: { error: "proof already used (replayed jti)" } });
    expect(await post(await forger.sign(target))).toMatchObject({ status: 401, body: { error: "proof certificate is not issued by our CA" } });
    expect(await post(await signer.sign(target, Date.now() / 1000 - 3600))).toMatchObject({ status: 401, body: { error: "proof expired" } });
    expect(await client.request("POST", "/api/data", { data: token })).toMatchObject({ status: 401, body: { error: "sender proof missing" } });
  });
});

describe.each([...RUNTIMES, "mixed"] as const)("failover, roles on %s", (runtime) => {
  // With mixed, server 1 (the one killed) and the coordinator run on Deno, server 2 on Bun.
  test("a killed server's requests go to the other one, and the coordinator logs the failure", async () => {
    await using mesh = await startMesh({ pki, runtime, coordinatorArgs: ["--health-interval", "60000"] });
    const { cluster, servers } = mesh;
    const client = mesh.client();
    await cluster.kill("server1");
    const results = await Promise.all([1, 2, 3, 4].map((i) => client.sendData(`after kill ${i}`)));
    expect(results.map((r) => r.status)).toEqual([200, 200, 200, 200]);
    expect(new Set(results.map((r) => r.body.server))).toEqual(new Set([servers[1]!.port]));
    await cluster.role("coordinator").waitForLine(new RegExp(`Server ${servers[0]!.url.replace(/\./g, "\\.")} failed: `));
  });
});

describe.each(RUNTIMES)("every server down, roles on %s", (runtime) => {
  test("with every server down the coordinator answers 503 JSON at once", async () => {
    await using mesh = await startMesh({ pki, runtime, coordinatorArgs: ["--health-interval", "60000"] });
    const { cluster, coordinator } = mesh;
    await Promise.all([cluster.kill("server1"), cluster.kill("server2")]);
    const tls = mutualTlsClientOptions(loadIdentity(pki, "client1"));
    const started = performance.now();
    // The first request finds both dead (each refused at once); the next is refused without trying.
    for (let i = 0; i < 2; i++) {
      const response = await fetch(`${coordinator}/api/data`, { method: "POST", tls, headers: { "content-type": "application/json" }, body: "{}" });
      expect(response.status).toBe(503);
      expect(((await response.json()) as { code: string }).code).toBe("ERR_UNAVAILABLE");
    }
    expect(performance.now() - started).toBeLessThan(2000);
  });
});

describe("retry safety", () => {
  test("a hung server: a POST with an Idempotency-Key fails over and is stored once", async () => {
    await using mesh = await startMesh({ pki, coordinatorArgs: ["--health-interval", "60000", "--timeout", "500"] });
    const { cluster, db } = mesh;
    const client = mesh.client();
    // Live traffic keeps a connection to each server (health probes use their own, identity-checked ones), so the
    // request below reaches server 1's socket and waits there, rather than dying in a handshake with it.
    await Promise.all([client.readCachedData(), client.readCachedData()]);
    cluster.role("server1").signal("SIGSTOP");
    // Consecutive requests start at alternating servers, so one of the two meets the hung server first.
    const results = [await client.sendData("idempotent 1"), await client.sendData("idempotent 2")];
    expect(results.map((r) => r.status)).toEqual([200, 200]);
    await cluster.role("coordinator").waitForLine(/failed: timeout/);
    cluster.role("server1").signal("SIGCONT");
    // server 1 now handles the request it held; the Idempotency-Key makes it a repeat, not a second record.
    await cluster.role("server1").waitForLine(/"POST \/api\/data HTTP\/1.1" 200/);
    const store = await openStore(db);
    expect(await store.count()).toBe(2);
    await store.close();
  });

  test("a hung server: a POST without an Idempotency-Key is not re-sent (502)", async () => {
    await using mesh = await startMesh({ pki, coordinatorArgs: ["--health-interval", "60000", "--timeout", "500"] });
    const { cluster, coordinator } = mesh;
    cluster.role("server1").signal("SIGSTOP");
    const bare = cluster.client("client1", [coordinator]);
    const signer = new ProofSigner(loadIdentity(pki, "client1"));
    const fernet = new Fernet(loadFernetKeys(pki));
    const statuses: number[] = [];
    for (let i = 0; i < 2; i++) {
      const data = fernet.encrypt(`no key ${i}`);
      const proof = await signer.sign({ method: "POST", path: "/api/data", payload: data });
      statuses.push((await bare.request("POST", "/api/data", { data, proof })).status);
    }
    expect(statuses.sort()).toEqual([200, 502]);
    cluster.role("server1").signal("SIGCONT");
  });
});

describe.each(RUNTIMES)("the coordinator's view of its servers, roles on %s", (runtime) => {
  test("invalidation with one server down: the report names the failed server", async () => {
    await using mesh = await startMesh({ pki, runtime, coordinatorArgs: ["--health-interval", "60000"] });
    const { cluster, servers } = mesh;
    await cluster.kill("server2");
    const report = await mesh.client().invalidateCache();
    expect(report.status).toBe(200);
    expect(report.body).toEqual({
      result: "ok",
      complete: false,
      acknowledged: [servers[0]!.url],
      failed: [{ server: servers[1]!.url, status: null, error: "connection refused (ECONNREFUSED)" }],
    });
  });

  test("a cached read through the coordinator reports its server and age, and a write invalidates it", async () => {
    await using mesh = await startMesh({ pki, runtime });
    const client = mesh.client();
    const first = [await client.readCachedData(), await client.readCachedData()];
    const second = [await client.readCachedData(), await client.readCachedData()];
    expect(first.map((a) => a.cached)).toEqual([false, false]);
    expect(second.map((a) => a.cached)).toEqual([true, true]);
    const written = await client.sendData("visible at once");
    for (let i = 0; i < 2; i++) {
      const read = await client.readCachedData();
      expect(read.snapshot.latest[0]).toMatchObject({ id: written.body.id, text: "visible at once" });
    }
  });
});

describe("cache across servers", () => {
  test("invalidation without a proof is refused at the coordinator, before it costs every server a request", async () => {
    await using mesh = await startMesh({ pki });
    const report = await mesh.client().request("POST", "/api/invalidate_cache", {});
    expect(report.status).toBe(401);
    expect(report.body).toEqual({ error: "sender proof missing", code: "ERR_PROOF" });
  });

  test("a server hung (SIGSTOP) through a write does not serve its old copy when it resumes", async () => {
    await using mesh = await startMesh({ pki, coordinatorArgs: ["--health-interval", "60000", "--timeout", "500"] });
    const { cluster, servers } = mesh;
    const client = mesh.client();
    const direct = cluster.client("client1", [servers[1]!.url], { direct: true });
    await direct.readCachedData();
    expect((await direct.readCachedData()).cached).toBe(true);
    cluster.role("server2").signal("SIGSTOP");
    const writes = [await client.sendData("while server 2 hung"), await client.sendData("still hung")];
    expect(writes.map((w) => w.status)).toEqual([200, 200]);
    cluster.role("server2").signal("SIGCONT");
    const after = await direct.readCachedData();
    expect(after.cached).toBe(false);
    expect(after.snapshot.latest.map((r) => r.id)).toEqual(expect.arrayContaining(writes.map((w) => w.body.id as number)));
  });
});

describe.each(RUNTIMES)("role start-up on %s", (runtime) => {
  async function runRole(args: string[], env: Record<string, string> = {}) {
    await using proc = Bun.spawn(roleCommand(runtime, "server", args), {
      env: { ...process.env, PKI_DIR: pki, DATABASE_URL: join(mkdtempSync(join(tmpdir(), "sm-")), "r.db"), ...env },
      stdout: "pipe",
      stderr: "pipe",
    });
    const [stdout, stderr, exitCode] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
    return { stdout, stderr: stderr.trim(), exitCode };
  }

  test("NODE_TLS_REJECT_UNAUTHORIZED=0 stops a role before it listens", async () => {
    const result = await runRole(["0"], { NODE_TLS_REJECT_UNAUTHORIZED: "0" });
    expect(result.exitCode).toBe(2);
    expect(result.stderr).toStartWith("server: NODE_TLS_REJECT_UNAUTHORIZED=0 is set");
    expect(result.stdout).not.toContain("listening");
  });

  test("bad configuration gets one line: missing certificate, port in use", async () => {
    const missing = await runRole(["0"], { PKI_DIR: "/nonexistent" });
    expect([missing.exitCode, missing.stderr]).toEqual([
      2,
      "server: missing /nonexistent/server_cert.pem: copy this host's files from the CA host, where ./pki.sh bundle NAME DIR --as server packs this host's identity NAME (./pki.sh issue NAME --server --san … issues it), or point --pki or PKI_DIR at the folder that holds them",
    ]);
    await using mesh = await startMesh({ pki, runtime });
    const port = String(mesh.servers[0]!.port);
    const busy = await runRole([port]);
    expect([busy.exitCode, busy.stderr]).toEqual([2, `server: port ${port} on 127.0.0.1 is already in use`]);
  });
});

test("waitFor fails with what it waited for", async () => {
  await expect(waitFor("the impossible", () => false, 50)).rejects.toThrow("timed out after 50 ms waiting for the impossible");
});
