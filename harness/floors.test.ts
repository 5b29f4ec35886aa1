// The floors of shared/ (docs/architecture.md, "The floors of shared/"), enforced: no production module imports one
// on a higher floor, and none imports test support (shared/testing/, harness/). Tests and the two check scripts that
// tests run may import anything.
import { describe, expect, test } from "bun:test";
import { readdirSync, readFileSync } from "node:fs";
import { dirname, join, normalize, relative } from "node:path";
import { REPO_ROOT } from "../shared/platform/config.ts";

const GROUND = ["shared/platform/errors.ts", "shared/platform/paths.ts", "shared/ops/metrics.ts", "shared/ops/trace.ts", "shared/authz/der.ts"];
const COORDINATOR_FEATURE = ["shared/ops/status-page.ts", "shared/ops/worker-view.ts", "shared/platform/worker-group.ts"];
/** Run by tests only, never by a role: they may reach up (docs/architecture.md says so). */
const CHECK_SCRIPTS = ["shared/db/runtime-check.ts", "shared/platform/runtime/runtime.deno-check.ts"];
const TEST_SUPPORT = 99;

/** A module's floor, 1 (the ground) to 6 (the roles), or TEST_SUPPORT. */
export function floorOf(path: string): number {
  if (path.startsWith("harness/") || path.startsWith("shared/testing/")) return TEST_SUPPORT;
  if (GROUND.includes(path)) return 1;
  if (COORDINATOR_FEATURE.includes(path) || path.startsWith("shared/coordinator/")) return 5;
  if (path.startsWith("shared/platform/") || path === "shared/ops/log.ts") return 2;
  if (path.startsWith("shared/db/") || path.startsWith("shared/authz/")) return 3;
  if (["shared/request-path/", "shared/token-path/", "shared/service/"].some((p) => path.startsWith(p))) return 4;
  if (path.startsWith("roles/")) return 6;
  throw new Error(`${path} is on no floor: add it to docs/architecture.md and to floorOf`);
}

function productionModules(dir: string): string[] {
  return readdirSync(join(REPO_ROOT, dir), { recursive: true, encoding: "utf8" })
    .filter((f) => f.endsWith(".ts") && !f.endsWith(".test.ts"))
    .map((f) => join(dir, f))
    .filter((f) => !CHECK_SCRIPTS.includes(f));
}

/** The repository paths a module imports (relative imports only; packages and node: are not ours). */
export function importsOf(path: string, text = readFileSync(join(REPO_ROOT, path), "utf8")): string[] {
  const found = [...text.matchAll(/^\s*(?:import|export)\b[^;]*?\bfrom\s+"(\.{1,2}\/[^"]+)"/gm), ...text.matchAll(/\bimport\(\s*"(\.{1,2}\/[^"]+)"\s*\)/g)];
  return found.map((m) => relative(REPO_ROOT, normalize(join(REPO_ROOT, dirname(path), m[1]!))));
}

describe("floors (docs/architecture.md)", () => {
  const modules = [...productionModules("shared"), ...productionModules("roles")];

  test("every production module is on a floor, and imports only from its own floor or below", () => {
    const upward = modules.flatMap((from) =>
      importsOf(from)
        .filter((to) => floorOf(to) > floorOf(from))
        .map((to) => `${from} (floor ${floorOf(from)}) → ${to} (${floorOf(to) === TEST_SUPPORT ? "test support" : `floor ${floorOf(to)}`})`),
    );
    expect(upward).toEqual([]);
    expect(modules.length).toBeGreaterThan(90); // it walked the tree, not an empty folder
  });

  test("the check sees an upward import and an import of test support", () => {
    const bad = 'import { UpstreamPool } from "../request-path/upstream.ts";\nimport { testPki } from "../testing/pki.ts";\n';
    expect(importsOf("shared/platform/http.ts", bad).map((to) => [to, floorOf(to)])).toEqual([
      ["shared/request-path/upstream.ts", 4],
      ["shared/testing/pki.ts", TEST_SUPPORT],
    ]);
    expect(floorOf("shared/platform/http.ts")).toBe(2);
  });
});

describe("one shape per role (docs/architecture.md)", () => {
  test("every role script reads in one sitting: at most 150 lines, its logic in shared/", () => {
    const roleScripts = productionModules("roles");
    const long = roleScripts
      .map((path) => [path, readFileSync(join(REPO_ROOT, path), "utf8").split("\n").length - 1] as const)
      .filter(([, lines]) => lines > 150);
    expect(long).toEqual([]);
    expect(roleScripts).toContain("roles/server.ts");
  });
});
