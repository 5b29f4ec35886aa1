// The coordinator with --workers: N processes on one port, their supervisor's status page and /metrics, a worker
// replaced when it dies, none left behind when the supervisor stops or is killed. Real processes, real mutual TLS.
import { beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { mutualTlsClientOptions, loadIdentity } from "../shared/platform/tls.ts";
import { startMesh, testPki, waitFor } from "../harness/fixtures/index.ts";
import { testedRuntimes } from "../shared/testing/unit-run.ts";

setDefaultTimeout(60_000);

let pki: string;
beforeAll(async () => {
  pki = await testPki("main");
});

/** The worker pids the supervisor logged: "coordinator worker N (pid P) listening on …". */
function workerPids(lines: string[]): Map<number, number> {
  const pids = new Map<number, number>();
  for (const line of lines) {
    const match = /coordinator worker (\d+) \(pid (\d+)\) listening/.exec(line);
    if (match) pids.set(Number(match[1]), Number(match[2]));
  }
  return pids;
}

const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

describe("coordinator --workers 2", () => {
  test("both workers serve one port; the supervisor's /status and /metrics cover both; a killed worker is replaced", async () => {
    await using mesh = await startMesh({ pki, coordinatorArgs: ["--workers", "2", "--admin-port", "0"] });
    const role = mesh.cluster.role(mesh.coordinatorRole);
    const pids = await waitFor("both workers to listen", () => (workerPids(role.lines).size === 2 ? workerPids(role.lines) : undefined));
    const admin = await mesh.cluster.adminUrl(mesh.coordinatorRole);
    const tls = mutualTlsClientOptions(loadIdentity(pki, "client1"));
    // A new connection each time: the kernel picks a worker per connection (SO_REUSEPORT hashes the 4-tuple).
    const healthOnNewConnection = async () =>
      (await fetch(`${mesh.coordinator}/health`, { tls, headers: { connection: "close" }, signal: AbortSignal.timeout(5000) } as RequestInit)).status;
    for (let i = 0; i < 24; i++) expect(await healthOnNewConnection()).toBe(200);
    const client = mesh.client();
    for (let i = 0; i < 4; i++) expect((await client.sendData(`through the workers ${i}`)).status).toBe(200);

    // /metrics: one exposition, each worker's series labelled with its number, both of them having answered.
    const metrics = await (await fetch(`${admin}/metrics`)).text();
    for (const worker of ["1", "2"]) expect(metrics).toMatch(new RegExp(`securemesh_http_requests_total\\{worker="${worker}",route="/health"`));
    expect(metrics.match(/^# TYPE securemesh_http_requests_total /gm)?.length).toBe(1);
    // Each worker's certificate and CA expiry (issue 21), from the material it loaded.
    for (const worker of ["1", "2"]) {
      for (const [kind, name] of [
        ["identity", "coordinator"],
        ["ca", ""],
      ]) {
        expect(metrics).toMatch(
          new RegExp(`securemesh_certificate_expiry_timestamp_seconds\\{worker="${worker}",kind="${kind}",name="${name}[^"]*",serial="[0-9A-F]+"\\} \\d+`),
        );
      }
    }
    // /status: both servers, in rotation in every worker, the forwarded writes counted over the workers.
    let statusReads = 0;
    const status = async () => {
      statusReads += 1;
      return (await (await fetch(`${admin}/status`)).json()) as { serversUp: number; servers: { requests: number }[] };
    };
    await waitFor("both servers in rotation in every worker", async () => (await status()).serversUp === 2);
    await waitFor("the writes to show in the merged status", async () => (await status()).servers.reduce((n, s) => n + s.requests, 0) >= 4);

    // kill -9 one worker: the supervisor starts another in its place, and the port keeps answering meanwhile.
    process.kill(pids.get(2)!, "SIGKILL");
    await role.waitForLine(/worker 2 is back \(pid \d+\)/);
    for (let i = 0; i < 8; i++) expect(await healthOnNewConnection()).toBe(200);
    const replaced = workerPids(role.lines).get(2)!;
    expect(replaced).not.toBe(pids.get(2));

    // The supervisor reads each worker's admin listener four times a second; none of that reaches the log, only the
    // test's own reads of the supervisor's.
    expect(role.lines.filter((line) => line.includes('"GET /status')).length).toBe(statusReads);

    // SIGTERM to the supervisor stops every worker.
    await mesh.cluster.stop([mesh.coordinatorRole]);
    await waitFor("every worker to exit with the supervisor", () => ![pids.get(1)!, replaced].some(alive));
  });

  test("a supervisor killed with -9 leaves no worker serving", async () => {
    await using mesh = await startMesh({ pki, coordinatorArgs: ["--workers", "2"] });
    const role = mesh.cluster.role(mesh.coordinatorRole);
    const pids = await waitFor("both workers to listen", () => (workerPids(role.lines).size === 2 ? workerPids(role.lines) : undefined));
    await mesh.cluster.kill(mesh.coordinatorRole);
    await waitFor("the orphaned workers to exit", () => ![...pids.values()].some(alive), 5000);
  });

  test.skipIf(!testedRuntimes().includes("deno"))("on Deno, --workers 2 is refused in one line instead of serving one worker unnoticed", async () => {
    await using mesh = await startMesh({ pki, runtime: "deno" });
    const started = await mesh.cluster.spawn("deno-workers", "coordinator", ["0", "--servers", mesh.servers[0]!.url, "--workers", "2"]).then(
      () => "listening",
      () => "refused",
    );
    expect(started).toBe("refused");
    expect(mesh.cluster.role("deno-workers").lines.join("\n")).toContain("--workers above 1 needs Bun");
  });
});
