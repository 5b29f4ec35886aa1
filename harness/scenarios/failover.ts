// Failover: server 1 is killed, the next request still succeeds through server 2, then server 1 rejoins.
import { expectThat, waitUntilInRotation } from "../fixtures/index.ts";
import { startScenarioMesh, successBodies, url, type Scenario } from "../scenario.ts";

export const failover: Scenario = {
  name: "failover",
  description: "kill server 1; requests keep succeeding through server 2; server 1 rejoins",
  async run(ctx) {
    const { cluster, ports, step, summary } = ctx;
    const mesh = await startScenarioMesh(ctx, ["--health-interval", "500"]);
    const { coordinator } = mesh;
    const send = async (message: string, count: number) => {
      // No cache check: its GETs would take every other round-robin turn, and this scenario is about where POSTs go.
      const run = await cluster.runClient("client1", ["--no-cache-check", "--message", message, "--count", String(count), "--coordinator", coordinator]);
      expectThat(run.exitCode === 0, `client1 failed (exit ${run.exitCode}):\n${run.lines.join("\n")}`);
      summary.push(...run.lines);
      return successBodies(run.lines);
    };

    step("a request is served while both servers are up");
    await send("before the failure", 1);

    step(`server 1 (${url(ports.server1)}) is killed with SIGKILL`);
    await cluster.kill("server1");

    step("the next requests still succeed, through server 2");
    const after = await send("after the failure", 2);
    expectThat(
      after.every((b) => b.server === ports.server2),
      `expected server 2 to serve, got ${JSON.stringify(after)}`,
    );
    const failed = await cluster.role("coordinator").waitForLine(new RegExp(`Server ${url(ports.server1).replace(/\./g, "\\.")} failed: `));
    summary.push(`coordinator: ${failed}`);

    step("server 1 restarts and rejoins the rotation");
    await mesh.restartServer(mesh.servers[0]!);
    await waitUntilInRotation(cluster, coordinator, url(ports.server1));
    const rejoined = await send("after the restart", 2);
    expectThat(
      rejoined.some((b) => b.server === ports.server1),
      `server 1 served none of ${JSON.stringify(rejoined)}`,
    );
    summary.push(`server 1 is back in rotation and served record ${rejoined.find((b) => b.server === ports.server1)!.id}`);
  },
};
