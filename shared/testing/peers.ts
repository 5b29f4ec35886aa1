// In-process route tests without a socket: what a listener would do, binding a verified caller to each request
// before the app sees it (shared/platform/runtime/peer.ts).
import { bindPeer } from "../platform/runtime/peer.ts";

/** `app`, seen by a caller whose client certificate names `identity` ("" for one that names no one). */
export function handledAs<A extends { handle(request: Request): Promise<Response> }>(app: A, identity: string, address = "127.0.0.1") {
  return { handle: (request: Request) => app.handle(bindPeer(request, { address, identity, serial: "01" })) };
}
