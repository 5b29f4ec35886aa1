// Pictures drawn from real runs: a scenario's role logs as terminal panes (SVG), and the status page in Chromium (PNG).
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { REPO_ROOT } from "../shared/platform/config.ts";
import { launchChromium } from "./browser.ts";
import type { Cluster } from "./cluster.ts";
import { renderTerminals } from "./terminal-svg.ts";

export const SCREENSHOT_DIR = join(REPO_ROOT, "docs", "screenshots");
/** About the seed's screenshot of five terminals; a scenario with more logs shows its first six. */
const MAX_PANES = 6;

/** Renders every log the cluster wrote, one pane per role titled with its port, to docs/screenshots/<name>.svg. */
export function recordScenario(cluster: Cluster, name: string, dir = SCREENSHOT_DIR): string {
  const panes = cluster.launched
    .filter((l) => existsSync(l.logFile))
    .slice(0, MAX_PANES)
    .map((l) => ({
      title: l.port ? `${l.name} :${l.port}` : l.name,
      lines: readFileSync(l.logFile, "utf8")
        .split("\n")
        .filter((line, i, all) => line !== "" || i < all.length - 1),
    }));
  mkdirSync(dir, { recursive: true });
  const file = join(dir, `${name}.svg`);
  writeFileSync(file, renderTerminals(panes, { maxLines: 22, maxColumns: 84, columns: 3 }));
  return file;
}

/**
 * Opens the coordinator's status page in Chromium, kills server 2, waits until the page shows it down, and saves
 * a screenshot: the picture shows a real failure as an operator sees it.
 */
export async function statusPageScreenshot(cluster: Cluster, admin: string, killed: { role: string; url: string }, file: string): Promise<number> {
  const { chromium } = await import("playwright-core");
  const browser = await launchChromium(chromium);
  try {
    const page = await browser.newPage({ viewport: { width: 1100, height: 260 } });
    await page.goto(admin);
    await page.locator("#summary").filter({ hasText: "2 of 2 servers up" }).waitFor({ timeout: 10_000 });
    const killedAt = performance.now();
    await cluster.kill(killed.role);
    await page.locator(`tr[data-server="${killed.url}"] .state`).filter({ hasText: "down" }).waitFor({ timeout: 10_000 });
    const shownAfterMs = performance.now() - killedAt;
    mkdirSync(join(file, ".."), { recursive: true });
    await page.screenshot({ path: file, fullPage: true });
    return shownAfterMs;
  } finally {
    await browser.close();
  }
}
