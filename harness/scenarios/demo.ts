// The lab's demo: two servers, the coordinator, and two clients printing success lines.
import { expectThat } from "../fixtures/index.ts";
import { startScenarioMesh, successBodies, url, type Scenario } from "../scenario.ts";

export const demo: Scenario = {
  name: "demo",
  description: "two servers, the coordinator, and two clients sending encrypted data",
  async run(ctx) {
    const { cluster, ports, step, summary } = ctx;
    const { coordinator } = await startScenarioMesh(ctx, ["--admin-port", String(ports.coordinatorAdmin)]);

    step("client1 and client2 send their messages");
    const runs = await Promise.all(
      ["client1", "client2"].map((name) =>
        cluster.runClient(name, ["--name", name, "--message", `Hello from ${name}`, "--count", "2", "--coordinator", coordinator]),
      ),
    );
    for (const [i, run] of runs.entries()) {
      const name = `client${i + 1}`;
      expectThat(run.exitCode === 0, `${name} exited ${run.exitCode}:\n${run.lines.join("\n")}`);
      expectThat(successBodies(run.lines).length === 2, `${name} printed no success lines:\n${run.lines.join("\n")}`);
      summary.push(...run.lines);
    }
    const served = new Set(runs.flatMap((r) => successBodies(r.lines).map((b) => b.server)));
    expectThat(served.size === 2, `expected both servers to serve requests, saw ${[...served].join(", ")}`);
    for (const [name, port] of [
      ["server1", ports.server1],
      ["server2", ports.server2],
    ] as const) {
      await cluster.role(name).waitForLine(/Decrypted data: Hello from client\d \(from client\d\)/);
      summary.push(`${name} (${url(port)}) logged its decrypted messages`);
    }
    summary.push(`status page and /metrics: ${await cluster.adminUrl("coordinator")}/ (live while a scenario runs)`);
  },
};
