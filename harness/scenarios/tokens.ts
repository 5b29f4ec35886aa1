// The token path: KeyServer releases a sealed token only to the SecureProxy, on behalf of a caller the policy
// allows, and the proxy calls the marketplace with it.
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { loadIdentity, mutualTlsClientOptions } from "../../shared/platform/tls.ts";
import { expectThat, startTokenStack, waitFor } from "../fixtures/index.ts";
import type { Scenario } from "../scenario.ts";

export const tokens: Scenario = {
  name: "tokens",
  description: "KeyServer + SecureProxy + marketplace: tokens sealed at rest, released only to the proxy, for the caller the policy allows",
  async run({ cluster, ports, tokenDb, step, summary }) {
    step("seeding a token with the KeyServer's admin CLI, starting KeyServer, marketplace and SecureProxy");
    const stack = await startTokenStack({ cluster, ports, tokenDb });
    const listed = await cluster.run("keyserver-admin", "keyserver", ["token", "list", "--data", stack.dataDir, "--db", tokenDb]);
    summary.push(...listed.lines.map((l) => `token list: ${l.trim()}`));
    const { itemUri } = stack;
    const item = { ClientId: "client1", TokenType: "marketplace", ApiUri: itemUri };

    step("client1's application asks the proxy to call the marketplace");
    const ok = await stack.requestApi(item);
    summary.push(`client1 → proxy → marketplace: ${ok.status} ${JSON.stringify(ok.body)}`);
    expectThat(ok.status === 200 && (ok.body.item as { id?: number })?.id === 1, `expected 200 with the item, got ${ok.status} ${JSON.stringify(ok.body)}`);

    step("other identities asking for client1's token get 403; ApiUri off the allowlist, or internal, gets 403; nothing is sent");
    const expectations: [string, Record<string, string>, string, number][] = [
      ["client2 asks for client1's token", item, "client2", 403],
      ["the coordinator asks for client1's token", item, "coordinator", 403],
      ["client1 asks for an unknown client's token", { ...item, ClientId: "nobody" }, "client1", 403],
      ["host off the allowlist", { ...item, ApiUri: "https://attacker.example/steal" }, "client1", 403],
      ["internal address", { ...item, ApiUri: "https://169.254.169.254/latest/meta-data/" }, "client1", 403],
      ["plain http", { ...item, ApiUri: itemUri.replace("https:", "http:") }, "client1", 403],
    ];
    for (const [label, body, caller, status] of expectations) {
      const answer = await stack.requestApi(body, caller);
      summary.push(`${label}: ${answer.status} ${JSON.stringify(answer.body)}`);
      expectThat(answer.status === status, `${label}: expected ${status}, got ${answer.status} ${JSON.stringify(answer.body)}`);
    }

    step("client1's certificate, calling the KeyServer directly, is refused");
    const direct = await fetch(`${stack.keyserver}/`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: "{}",
      tls: mutualTlsClientOptions(loadIdentity(cluster.pki, "client1")),
    });
    summary.push(`client1 → KeyServer: ${direct.status} ${await direct.text()}`);
    expectThat(direct.status === 403, `expected 403 for client1 at the KeyServer, got ${direct.status}`);

    step("token rotate-key without the KeyServer's --db (as the old docs printed it) is refused, naming both; nothing is lost (issue 23)");
    const wrongStore = await cluster.run("keyserver-rotate-no-db", "keyserver", ["token", "rotate-key", "--data", stack.dataDir]);
    summary.push(`token rotate-key without --db: exit ${wrongStore.exitCode}: ${wrongStore.lines.join(" ")}`);
    expectThat(
      wrongStore.exitCode === 2 && /^keyserver: keyring .* belongs to token store .*, not to sqlite .* \(no such file\)/.test(wrongStore.lines[0] ?? ""),
      `expected rotate-key without --db to be refused naming both stores, got exit ${wrongStore.exitCode}: ${wrongStore.lines.join(" | ")}`,
    );
    const still = await stack.requestApi(item);
    expectThat(still.status === 200, `a release after the refused rotation: expected 200, got ${still.status} ${JSON.stringify(still.body)}`);

    step("token rotate-key twice while client1's calls keep going: none may fail");
    let released = 0;
    const failed: string[] = [];
    let rotating = true;
    const traffic = (async () => {
      while (rotating) {
        const answer = await stack.requestApi(item);
        if (answer.status === 200) released++;
        else failed.push(`${answer.status} ${JSON.stringify(answer.body)}`);
      }
    })();
    for (const round of [1, 2]) {
      const rotated = await cluster.run(`keyserver-rotate-${round}`, "keyserver", ["token", "rotate-key", "--data", stack.dataDir, "--db", tokenDb]);
      expectThat(rotated.exitCode === 0, `token rotate-key failed:\n${rotated.lines.join("\n")}`);
      summary.push(`token rotate-key: ${rotated.lines.join(" ").trim()}`);
      const before = released + failed.length;
      await waitFor(`calls after rotation ${round}`, () => released + failed.length >= before + 3);
    }
    rotating = false;
    await traffic;
    summary.push(`calls during the rotations: ${released} released, ${failed.length} failed`);
    expectThat(failed.length === 0, `calls failed during rotate-key: ${failed.slice(0, 3).join("; ")}`);
    const after = await cluster.run("keyserver-admin", "keyserver", ["token", "list", "--data", stack.dataDir, "--db", tokenDb]);
    summary.push(...after.lines.map((l) => `token list: ${l.trim()}`));

    step("no log holds the token");
    const marketplaceCalls = cluster.role("marketplace").lines.filter((l) => l.includes("GET /api/item"));
    // The first call, the one after the refused rotation, and those during the rotations.
    expectThat(marketplaceCalls.length === 2 + released, `the marketplace should have been called ${2 + released} times, saw ${marketplaceCalls.length}`);
    const logDir = cluster.logDir;
    for (const file of readdirSync(logDir).filter((f) => f.endsWith(".log"))) {
      expectThat(!readFileSync(join(logDir, file), "utf8").includes(stack.token), `${file} contains the token`);
    }
    const audit = cluster.role("keyserver").lines.filter((l) => l.startsWith("AUDIT"));
    summary.push(`audit: ${audit.length} release attempts logged, no token in any log; the first: ${audit[0]?.replace(/^AUDIT \S+ /, "")}`);
  },
};
