// A TCP relay that can be cut and restored: a database outage as the roles see it, without stopping the database.
// With `dropClientAfter`, it also passes a chunk on and then drops the client (a node dying under a COMMIT). Its
// faults (setFaults) slow what clients send, or drop a share of clients right after a chunk went on: a brown-out of
// the process behind it, made in front of it (issue 20), with no test hook in the process itself.
import net from "node:net";

export interface TcpRelayOptions {
  /** Asked with each chunk from a client, after the chunk went on: true drops that client before any answer. */
  dropClientAfter?: (chunk: Buffer) => boolean;
}

/** Faults a relay applies to what clients send, until set back to none. */
export interface RelayFaults {
  /** Each chunk from a client waits this long before it goes on (in order). */
  delayMs: number;
  /** This share of chunks goes on, and then the client is dropped before any answer (0 to 1). */
  dropShare: number;
}

export class TcpRelay implements AsyncDisposable {
  readonly #server: net.Server;
  readonly #sockets = new Set<net.Socket>();
  #cut = false;
  #faults: RelayFaults = { delayMs: 0, dropShare: 0 };
  /** Clients dropped by the dropShare fault. */
  dropped = 0;

  private constructor(server: net.Server) {
    this.#server = server;
  }

  static start(target: { host: string; port: number }, options: TcpRelayOptions = {}): Promise<TcpRelay> {
    let relay: TcpRelay;
    const server = net.createServer((client) => {
      if (relay.#cut) {
        client.destroy();
        return;
      }
      const upstream = net.connect(target.port, target.host);
      for (const socket of [client, upstream]) {
        relay.#sockets.add(socket);
        socket.on("error", () => {});
        socket.on("close", () => {
          relay.#sockets.delete(socket);
          client.destroy();
          // The client is gone: the server still reads what it was sent, then the connection ends.
          if (socket === client) upstream.end();
        });
      }
      const pass = (chunk: Buffer) => {
        if (client.destroyed) return;
        upstream.write(chunk);
        if (options.dropClientAfter?.(chunk)) client.destroy();
        else if (relay.#faults.dropShare > 0 && Math.random() < relay.#faults.dropShare) {
          relay.dropped += 1;
          client.destroy();
        }
      };
      // Delayed chunks keep their order: each waits for the one before it.
      let ready = Promise.resolve();
      client.on("data", (chunk: Buffer) => {
        const delayMs = relay.#faults.delayMs;
        if (delayMs === 0) {
          ready = ready.then(() => pass(chunk));
          return;
        }
        ready = ready.then(() => new Promise<void>((resolve) => setTimeout(() => (pass(chunk), resolve()), delayMs)));
      });
      upstream.pipe(client);
    });
    relay = new TcpRelay(server);
    return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(relay)));
  }

  get port(): number {
    return (this.#server.address() as net.AddressInfo).port;
  }

  get hostPort(): string {
    return `127.0.0.1:${this.port}`;
  }

  setFaults(faults: Partial<RelayFaults>): void {
    this.#faults = { ...this.#faults, ...faults };
  }

  /** Drops every connection and refuses new ones until restore(). */
  cut(): void {
    this.#cut = true;
    for (const socket of this.#sockets) socket.destroy();
  }

  restore(): void {
    this.#cut = false;
  }

  close(): Promise<void> {
    this.cut();
    return new Promise((resolve) => this.#server.close(() => resolve()));
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}
