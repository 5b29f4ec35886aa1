// Each role on its own test host, the records on a Galera cluster, and one host, link or database node lost at a time.
import { expectThat } from "../cluster.ts";
import { FULL_PLAN, runMultihost, SHORT_PLAN } from "../multihost/run.ts";
import type { Scenario } from "../scenario.ts";

export const multihost: Scenario = {
  name: "multihost",
  description: "every role on its own network-namespace host, Galera, faults under load (--short: one of each)",
  ownPki: true, // it issues a certificate per host address
  async run(ctx) {
    const { misses, table } = await runMultihost(ctx.cluster, ctx.short ? SHORT_PLAN : FULL_PLAN, ctx.step);
    ctx.summary.push(...table);
    if (misses.length) console.log(["", ...table].join("\n"));
    expectThat(misses.length === 0, `the goal (0 failed client requests, every acknowledged write stored once) was missed:\n  ${misses.join("\n  ")}`);
  },
};
