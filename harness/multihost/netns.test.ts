// Test hosts from network namespaces: reachable, cut and healed, partitioned, and always removed, also after SIGKILL.
import { afterEach, describe, expect, setDefaultTimeout, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { waitFor } from "../cluster.ts";
import { cleanupStaleNetworks, createTestNetwork, namespacesUnavailableReason, type TestHost, type TestNetwork } from "./netns.ts";
import { ip } from "./run-lease.ts";

setDefaultTimeout(60_000);

const netnsNames = () =>
  ip(["netns", "list"])
    .split("\n")
    .map((l) => l.split(" ")[0]!)
    .filter(Boolean);

/** An echo listener on port 0 inside `host`; resolves with its port once it listens. */
async function echoServer(host: TestHost): Promise<{ port: number; proc: Bun.Subprocess }> {
  const code = `const l = Bun.listen({ hostname: "${host.address}", port: 0, socket: { data(s, d) { s.write(d); } } }); console.log(l.port);`;
  const proc = Bun.spawn(host.exec([process.execPath, "-e", code]), { stdout: "pipe", stderr: "inherit" });
  const reader = proc.stdout.getReader();
  const { value } = await reader.read();
  reader.releaseLock();
  return { port: Number(new TextDecoder().decode(value).trim()), proc };
}

/** From inside `from`, sends "ping" to address:port and returns what came back, or the error; gives up after 1 s. */
async function tcpRoundTrip(from: TestHost, address: string, port: number): Promise<string> {
  const code = `
    const timer = setTimeout(() => { console.log("timeout"); process.exit(0); }, 1000);
    try {
      await Bun.connect({ hostname: "${address}", port: ${port}, socket: {
        open(s) { s.write("ping"); },
        data(s, d) { console.log(new TextDecoder().decode(d)); clearTimeout(timer); s.end(); },
        connectError(_, e) { console.log(e.code ?? e.message); clearTimeout(timer); },
      } });
    } catch (e) { console.log(e.code ?? e.message); clearTimeout(timer); }`;
  const proc = Bun.spawn(from.exec([process.execPath, "-e", code]), { stdout: "pipe", stderr: "pipe" });
  const [out] = await Promise.all([new Response(proc.stdout).text(), proc.exited]);
  return out.trim();
}

function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return !/^State:\s+Z/m.test(readFileSync(`/proc/${pid}/status`, "utf8"));
  } catch {
    return false;
  }
}

const networks: TestNetwork[] = [];
const children: Bun.Subprocess[] = [];
afterEach(() => {
  for (const child of children.splice(0)) child.kill("SIGKILL");
  for (const network of networks.splice(0)) network.dispose();
});

describe("test network", () => {
  test("namespaces can be made on this machine (root and iproute2), or the test says why in one line", () => {
    expect(namespacesUnavailableReason()).toBeUndefined();
  });

  test("two hosts talk over TCP; a cut link and a partition stop them; healing restores it; dispose removes all", async () => {
    const network = await createTestNetwork({ hosts: ["a", "b"] });
    networks.push(network);
    const [a, b] = [network.host("a"), network.host("b")];
    expect(netnsNames()).toEqual(expect.arrayContaining([a.ns, b.ns]));
    const { port, proc } = await echoServer(b);
    children.push(proc);

    expect(await tcpRoundTrip(a, b.address, port)).toBe("ping");
    expect(await tcpRoundTrip(a, "127.0.0.1", 3306)).not.toBe("ping"); // a host's loopback is its own

    network.cutLink("b");
    expect(await tcpRoundTrip(a, b.address, port)).toBe("timeout");
    network.healLink("b");
    expect(await tcpRoundTrip(a, b.address, port)).toBe("ping");

    network.isolate("b", ["a"]);
    expect(await tcpRoundTrip(a, b.address, port)).not.toBe("ping");
    network.heal("b");
    expect(await tcpRoundTrip(a, b.address, port)).toBe("ping");

    expect(await network.killAll("b")).toBe(1);
    expect(network.pids("b")).toEqual([]);

    await network[Symbol.asyncDispose]();
    expect(netnsNames()).not.toEqual(expect.arrayContaining([a.ns]));
    expect(netnsNames().filter((n) => n === a.ns || n === b.ns)).toEqual([]);
  });

  test("a run killed with SIGKILL leaves its set, which the next start removes; a live run's set is left alone", async () => {
    const holder = join(import.meta.dir, "netns-holder.ts");
    const start = async () => {
      const proc = Bun.spawn([process.execPath, holder, "x1", "x2"], { stdout: "pipe", stderr: "inherit", stdin: "pipe" });
      children.push(proc);
      const reader = proc.stdout.getReader();
      const { value } = await reader.read();
      reader.releaseLock();
      const words = new TextDecoder().decode(value).trim().split(" ");
      return { proc, namespaces: words.slice(0, -1), sleeper: Number(words.at(-1)) };
    };
    const live = await start();
    const killed = await start();
    expect(netnsNames()).toEqual(expect.arrayContaining([...live.namespaces, ...killed.namespaces]));

    killed.proc.kill("SIGKILL");
    await killed.proc.exited;
    expect(netnsNames()).toEqual(expect.arrayContaining(killed.namespaces)); // nothing ran to remove them

    expect(isRunning(killed.sleeper)).toBe(true); // a process in a namespace outlives the run that started it
    const removed = cleanupStaleNetworks();
    expect(removed.length).toBe(1);
    await waitFor("the stale run's process to be killed", () => !isRunning(killed.sleeper), 5000);
    expect(netnsNames().filter((n) => killed.namespaces.includes(n))).toEqual([]);
    expect(netnsNames()).toEqual(expect.arrayContaining(live.namespaces));

    live.proc.kill("SIGTERM"); // its own handler removes its set
    expect(await live.proc.exited).toBe(143);
    expect(netnsNames().filter((n) => live.namespaces.includes(n))).toEqual([]);
  });
});
