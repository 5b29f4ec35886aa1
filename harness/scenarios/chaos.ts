// Faults on a bad day: kill -9 and SIGSTOP under load, every server down, a database outage, a coordinator lost.
import { allServersDown, coordinatorFailover, databaseOutage, faultTable, hangUnderLoad, killNineUnderLoad, type FaultRow, type MeshHandles } from "../chaos-checks.ts";
import { Progress } from "../progress.ts";
import { startMesh, type Scenario } from "../scenario.ts";
import { TcpRelay } from "../tcp-relay.ts";
import { startTokenStack } from "../token-stack.ts";

/** The MariaDB the database drill cuts off; the harness reaches it through a relay it controls. */
const MARIADB = { host: "127.0.0.1", port: 3306 };

export const chaos: Scenario = {
  name: "chaos",
  description: "kill -9 and SIGSTOP under load, every server down, a database outage, two coordinators",
  async run(ctx) {
    const { cluster, ports, step, summary } = ctx;
    const coordinator = await startMesh(ctx, ["--health-interval", "500"]);
    const progress = new Progress();
    const mesh: MeshHandles = {
      cluster, coordinator, db: ctx.db,
      servers: [{ name: "server1", port: ports.server1 }, { name: "server2", port: ports.server2 }],
      client: (name, coordinators = [coordinator]) => cluster.client(name, coordinators),
      status: (text) => progress.status(() => `    ${text()}`),
    };
    const rows: FaultRow[] = [];
    const record = (row: FaultRow) => {
      rows.push(row);
      progress.line(`    ok   ${row.fault}: ${row.requests} requests, ${row.failed} failed; ${row.detail} (${progress.elapsed()})`);
    };

    step("kill -9 server 1 while 4 clients send 500 requests each");
    record(await killNineUnderLoad(mesh, 4, 500));
    step("SIGSTOP server 2 during 6 s of read load (coordinator timeout 2000 ms), then SIGCONT");
    record(await hangUnderLoad(mesh, 4, 2000, 6000));
    step("every server down, then back");
    record(await allServersDown(mesh));
    step("two coordinators: kill -9 the first while 4 clients send 200 requests each");
    const second = await cluster.startCoordinator("coordinator2", ports.coordinator + 1, mesh.servers.map((s) => `https://127.0.0.1:${s.port}`));
    record(await coordinatorFailover(mesh, second, 4, 200));

    step("database outage: servers and KeyServer on MariaDB through a relay, which is cut and restored");
    await using relay = await TcpRelay.start(MARIADB);
    const dbUrl = `mysql://root@127.0.0.1:${relay.port}/test`;
    const dbServers = await Promise.all([cluster.startServer("db-server1", 0, ["--db", dbUrl]), cluster.startServer("db-server2", 0, ["--db", dbUrl])]);
    const dbCoordinator = await cluster.startCoordinator("db-coordinator", 0, dbServers, ["--health-interval", "500"]);
    const stack = await startTokenStack(cluster, { keyserver: 0, secureproxy: 0, marketplace: 0 }, dbUrl);
    const itemUri = `${stack.marketplace.replace("127.0.0.1", "localhost")}/api/item`;
    record(await databaseOutage(
      { ...mesh, coordinator: dbCoordinator, db: dbUrl, client: (name) => cluster.client(name, [dbCoordinator]) },
      dbUrl, relay, () => stack.requestApi({ ClientId: "client1", TokenType: "marketplace", ApiUri: itemUri }),
    ));
    summary.push(...faultTable(rows));
  },
};
