// Hostile input against every role: TLS refusals, malformed HTTP, crypto and application attacks, leaked secrets.
import { join } from "node:path";
import { REPO_ROOT, loadFernetKeys } from "../../shared/config.ts";
import { expectThat } from "../cluster.ts";
import { hostileCertificates, Tally } from "../hostile.ts";
import { Progress } from "../progress.ts";
import { startMesh, type Scenario } from "../scenario.ts";
import { rolesHealthy, runSecurityChecks, scanLogs } from "../security-checks.ts";
import { startTokenStack } from "../token-stack.ts";

const ROLE_SCRIPTS = ["server", "coordinator", "keyserver", "secureproxy", "marketplace", "client"];

export const security: Scenario = {
  name: "security",
  description: "hostile TLS, HTTP, crypto and application input against every role; logs scanned for secrets",
  ownPki: true,
  async run(ctx) {
    const { cluster, ports, step, summary, tokenDb } = ctx;
    step("issuing hostile certificates (expired, not yet valid, revoked, …) before the roles start");
    const otherPki = join(cluster.logDir, "other-pki");
    await using pkiRun = Bun.spawn(["bash", join(REPO_ROOT, "pki.sh")], { env: { ...process.env, PKI_DIR: otherPki }, stdout: "ignore", stderr: "inherit" });
    expectThat((await pkiRun.exited) === 0, "pki.sh for the other CA failed");
    const hostileCerts = await hostileCertificates(cluster.pki, otherPki);

    const coordinator = await startMesh(ctx);
    step("starting KeyServer, marketplace and SecureProxy");
    const stack = await startTokenStack(cluster, ports, tokenDb);
    const server = `https://127.0.0.1:${ports.server1}`;

    step("running the hostile cases (TLS cases 200 times each, on every mutual-TLS role)");
    const progress = new Progress();
    const tally = new Tally((line) => progress.line(`    ${line}  (${progress.elapsed()})`), (text) => progress.status(() => `    ${text()}`));
    await runSecurityChecks({ cluster, otherPki, server, coordinator, stack, hostileCerts }, tally, { tlsAttempts: 200, httpAttempts: 20, slowloris: true });

    step("NODE_TLS_REJECT_UNAUTHORIZED=0 in a role's environment: the role refuses to start");
    for (const script of ROLE_SCRIPTS) {
      await tally.run(script, "start with NODE_TLS_REJECT_UNAUTHORIZED=0", 1, async () => {
        await using proc = Bun.spawn([process.execPath, join(REPO_ROOT, "roles", `${script}.ts`), "0"], {
          env: { ...process.env, PKI_DIR: cluster.pki, NODE_TLS_REJECT_UNAUTHORIZED: "0" }, stdout: "pipe", stderr: "pipe",
        });
        const [stderr, code] = await Promise.all([new Response(proc.stderr).text(), proc.exited]);
        return code === 2 && stderr.includes("NODE_TLS_REJECT_UNAUTHORIZED=0 is set") ? null : `exit ${code}: ${stderr.trim().slice(0, 80)}`;
      });
    }

    step("every role is still up and healthy; no log holds a secret or a 5xx");
    const sick = await rolesHealthy(cluster, [server, `https://127.0.0.1:${ports.server2}`, coordinator, stack.keyserver, stack.secureproxy, stack.marketplace]);
    const findings = scanLogs(cluster.logDir, { fernetKeys: loadFernetKeys(cluster.pki), apiToken: stack.token });

    summary.push(...tally.table().split("\n"));
    const attempts = tally.results.reduce((n, r) => n + r.attempts, 0);
    summary.push(`${tally.results.length} cases, ${attempts} attempts, ${tally.failures.length} cases with unexpected outcomes; roles unhealthy afterwards: ${sick.length}; log findings: ${findings.length}`);
    expectThat(tally.failures.length === 0, `unexpected outcomes:\n${tally.failures.map((f) => `  ${f.role} ${f.name}: ${f.unexpected.join("; ")}`).join("\n")}`);
    expectThat(sick.length === 0, `roles not healthy afterwards: ${sick.join(", ")}`);
    expectThat(findings.length === 0, `secrets or 5xx in the logs:\n${findings.slice(0, 10).join("\n")}`);
  },
};
