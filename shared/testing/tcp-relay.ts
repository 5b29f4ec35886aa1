// A TCP relay that can be cut and restored: a database outage as the roles see it, without stopping the database.
// With `dropClientAfter`, it also passes a chunk on and then drops the client (a node dying under a COMMIT).
import net from "node:net";

export interface TcpRelayOptions {
  /** Asked with each chunk from a client, after the chunk went on: true drops that client before any answer. */
  dropClientAfter?: (chunk: Buffer) => boolean;
}

export class TcpRelay implements AsyncDisposable {
  readonly #server: net.Server;
  readonly #sockets = new Set<net.Socket>();
  #cut = false;

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
      client.on("data", (chunk: Buffer) => {
        upstream.write(chunk);
        if (options.dropClientAfter?.(chunk)) client.destroy();
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
