// SIGTERM drains a role (issue 20): health fails first, accepting stops once the coordinator took the server out,
// requests in flight finish, then the role exits 0, each step logged; under write load, nothing fails or is lost.
import { expect, setDefaultTimeout, test } from "bun:test";
import { checkRecords } from "../harness/chaos-checks.ts";
import { countRecords } from "../harness/scenario.ts";
import { runLoad, startMesh } from "../harness/fixtures/index.ts";
import { DRAIN_QUIET_MS } from "../shared/platform/drain.ts";
import { testedRuntimes } from "../shared/testing/unit-run.ts";

setDefaultTimeout(60_000);

// On Deno the listener is node:https, whose stop without closing is Deno's own path (node-listener.ts).
for (const runtime of testedRuntimes())
  test(`a server on ${runtime} sent SIGTERM under write load: 503 on /health, then no new connections, in-flight finished, exit 0; 0 failed`, async () => {
    await using mesh = await startMesh({ runtime, coordinatorArgs: ["--health-interval", "300"] });
    const victim = mesh.cluster.role(mesh.servers[0]!.name);
    const clients = [mesh.client("client1"), mesh.client("client2")];
    const before = await countRecords(mesh.db);
    let signalled = false;
    let acks = 0;
    let exit: { code: number; acks: number } | undefined;
    const load = await runLoad({
      concurrency: 4,
      // Writes go on until the server has exited and as many more were acknowledged after it as before the signal.
      until: () => exit !== undefined && acks >= 2 * exit.acks,
      async request(worker, i) {
        const { status, body } = await clients[worker % 2]!.sendData(`drain ${worker}-${i}`);
        return status === 200 ? (body.id as number) : `${status} ${JSON.stringify(body)}`;
      },
      during(_elapsed, acknowledged) {
        acks = acknowledged;
        if (signalled || acks < 100) return;
        signalled = true;
        victim.signal("SIGTERM");
        void victim.proc.exited.then((code) => (exit = { code, acks }));
      },
    });
    expect({ signalled, exitCode: exit?.code, errors: load.errors, samples: load.errorSamples }).toEqual({
      signalled: true,
      exitCode: 0,
      errors: 0,
      samples: [],
    });
    const steps = victim.lines.filter((l) => /draining:|drained:|stopped$/.test(l)).map((l) => l.replace(/ \(.*$|;.*$/, ""));
    expect(steps).toEqual([
      "draining: /health answers 503 so that callers take this process out",
      "draining: no longer accepting",
      "drained: every request in flight finished",
      "server stopped",
    ]);
    // Health failed first: the coordinator had stopped sending before the server stopped accepting.
    expect(victim.lines.find((l) => l.startsWith("draining: no longer accepting"))).toContain(`(no request for ${DRAIN_QUIET_MS} ms)`);
    const { records, lost, duplicates } = await checkRecords(mesh.db, before, load.acks);
    expect({ lost, duplicates, stored: records }).toEqual({ lost: 0, duplicates: 0, stored: load.acks.length });
  });
