// The token path: KeyServer releases a sealed token only to the SecureProxy, which calls the marketplace with it.
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { loadIdentity, mutualTlsClientOptions } from "../../shared/tls.ts";
import { expectThat } from "../cluster.ts";
import type { Scenario } from "../scenario.ts";
import { startTokenStack } from "../token-stack.ts";

export const tokens: Scenario = {
  name: "tokens",
  description: "KeyServer + SecureProxy + marketplace: tokens sealed at rest, released only to the proxy",
  async run({ cluster, ports, tokenDb, step, summary }) {
    step("seeding a token with the KeyServer's admin CLI, starting KeyServer, marketplace and SecureProxy");
    const stack = await startTokenStack(cluster, ports, tokenDb);
    const listed = await cluster.run("keyserver-admin", "keyserver", ["token", "list", "--data", stack.dataDir, "--db", tokenDb]);
    summary.push(...listed.lines.map((l) => `token list: ${l.trim()}`));
    const itemUri = `${stack.marketplace.replace("127.0.0.1", "localhost")}/api/item`;

    step("client1's application asks the proxy to call the marketplace");
    const ok = await stack.requestApi({ ClientId: "client1", TokenType: "marketplace", ApiUri: itemUri });
    summary.push(`proxy → marketplace: ${ok.status} ${JSON.stringify(ok.body)}`);
    expectThat(ok.status === 200 && (ok.body.item as { id?: number })?.id === 1, `expected 200 with the item, got ${ok.status} ${JSON.stringify(ok.body)}`);

    step("an unknown client gets 404; ApiUri off the allowlist, or internal, gets 403 and nothing is sent");
    const expectations: [string, Record<string, string>, number][] = [
      ["unknown client", { ClientId: "nobody", TokenType: "marketplace", ApiUri: itemUri }, 404],
      ["host off the allowlist", { ClientId: "client1", TokenType: "marketplace", ApiUri: "https://attacker.example/steal" }, 403],
      ["internal address", { ClientId: "client1", TokenType: "marketplace", ApiUri: "https://169.254.169.254/latest/meta-data/" }, 403],
      ["plain http", { ClientId: "client1", TokenType: "marketplace", ApiUri: itemUri.replace("https:", "http:") }, 403],
    ];
    for (const [label, body, status] of expectations) {
      const answer = await stack.requestApi(body);
      summary.push(`${label}: ${answer.status} ${JSON.stringify(answer.body)}`);
      expectThat(answer.status === status, `${label}: expected ${status}, got ${answer.status} ${JSON.stringify(answer.body)}`);
    }

    step("client1's certificate, calling the KeyServer directly, is refused");
    const direct = await fetch(`${stack.keyserver}/`, {
      method: "POST", headers: { "content-type": "application/json" }, body: "{}",
      tls: mutualTlsClientOptions(loadIdentity(cluster.pki, "client1")),
    });
    summary.push(`client1 → KeyServer: ${direct.status} ${await direct.text()}`);
    expectThat(direct.status === 403, `expected 403 for client1 at the KeyServer, got ${direct.status}`);

    step("no log holds the token");
    const marketplaceCalls = cluster.role("marketplace").lines.filter((l) => l.includes("GET /api/item"));
    expectThat(marketplaceCalls.length === 1, `the marketplace should have been called once, saw ${marketplaceCalls.length}`);
    const logDir = cluster.logDir;
    for (const file of readdirSync(logDir).filter((f) => f.endsWith(".log"))) {
      expectThat(!readFileSync(join(logDir, file), "utf8").includes(stack.token), `${file} contains the token`);
    }
    summary.push(`audit: ${cluster.role("keyserver").lines.filter((l) => l.startsWith("AUDIT")).length} release attempts logged, no token in any log`);
  },
};
