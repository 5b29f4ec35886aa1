// What a scenario is: data plus small steps (start, act, expect), run against a Cluster.
import { randomUUID } from "node:crypto";
import { loadFernetKeys } from "../shared/platform/config.ts";
import { Fernet } from "../shared/request-path/fernet.ts";
import { payloadDigest } from "../shared/request-path/proof.ts";
import { openStore } from "../shared/request-path/store.ts";
import { startMesh, type Cluster, type Mesh } from "./fixtures/index.ts";

export interface Ports {
  server1: number;
  server2: number;
  coordinator: number;
  keyserver: number;
  secureproxy: number;
  marketplace: number;
  haproxy: number;
  /** The coordinator's admin listener (status page, /metrics), where a scenario turns it on. */
  coordinatorAdmin: number;
}

export interface ScenarioContext {
  cluster: Cluster;
  ports: Ports;
  /** The servers' record store URL or sqlite path. */
  db: string;
  /** The KeyServer's token store URL or sqlite path. */
  tokenDb: string;
  /** Prints one progress line. */
  step(message: string): void;
  /** Lines for the closing summary. */
  summary: string[];
  /** --short: a scenario's bounded version (multihost: one fault of each kind). */
  short?: boolean;
}

export interface Scenario {
  name: string;
  description: string;
  /** Runs on a fresh PKI in its log folder, because it issues and revokes certificates. */
  ownPki?: boolean;
  run(ctx: ScenarioContext): Promise<void>;
}

/** The seed's ports, shifted together by --base-port (5000 keeps them as they are). */
export function seedPorts(basePort = 5000): Ports {
  const shift = basePort - 5000;
  return {
    server1: 5001 + shift,
    server2: 5002 + shift,
    coordinator: 8000 + shift,
    keyserver: 5003 + shift,
    secureproxy: 5004 + shift,
    marketplace: 5005 + shift,
    haproxy: 8080 + shift,
    coordinatorAdmin: 9901 + shift,
  };
}

export const url = (port: number) => `https://127.0.0.1:${port}`;

/** The JSON after "Success: " in a client's output line. */
export function successBodies(lines: string[]): { result: string; id: number; server: number }[] {
  return lines.filter((l) => / Success: /.test(l)).map((l) => JSON.parse(l.slice(l.indexOf("Success: ") + 9)));
}

/** The mesh of a scenario: servers 1 and 2 and the coordinator on its ports and its record store, announced as a step. */
export function startScenarioMesh(ctx: ScenarioContext, coordinatorArgs: string[] = []): Promise<Mesh> {
  ctx.step("starting server 1, server 2 and the coordinator");
  return startMesh({ cluster: ctx.cluster, ports: ctx.ports, db: ctx.db, coordinatorArgs });
}

/** Writes records straight into the servers' store, as earlier traffic would have. */
export async function seedRecords(db: string, pki: string, count: number): Promise<void> {
  const store = await openStore(db);
  const fernet = new Fernet(loadFernetKeys(pki));
  try {
    for (let i = 0; i < count; i++) {
      const token = fernet.encrypt(`seeded record ${i}`);
      await store.insert({ sender: i % 2 ? "client1" : "client2", token, jti: randomUUID(), digest: payloadDigest(token), server: 0 });
    }
  } finally {
    await store.close();
  }
}

export async function countRecords(db: string): Promise<number> {
  const store = await openStore(db);
  try {
    return await store.count();
  } finally {
    await store.close();
  }
}
