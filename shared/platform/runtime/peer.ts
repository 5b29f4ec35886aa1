// Who sent a request, as its listener verified it: the TLS peer's identity and serial, and its address. Every
// listener on both runtimes binds this to the Request it hands the app, so handlers decide on the connection's
// own certificate (a header could be forged; this cannot) and revocation is asked again on every request.

/** The verified caller of one request. */
export interface RequestPeer {
  /** The caller's address, for the access log ("-" when unknown). */
  address: string;
  /** The SPIFFE ID its client certificate names; "" without mutual TLS, or for a certificate naming no one. */
  identity: string;
  /** Its certificate's serial number (hex); "" without mutual TLS. */
  serial: string;
}

const peers = new WeakMap<Request, RequestPeer>();

/** Set by the listener that accepted the request, before the app sees it. */
export function bindPeer(request: Request, peer: RequestPeer): Request {
  peers.set(request, peer);
  return request;
}

/** The verified caller of `request`, or undefined for a request no listener accepted (an in-process test). */
export function peerOf(request: Request): RequestPeer | undefined {
  return peers.get(request);
}

/** The caller's identity, "" when none was verified: what a policy decision takes. */
export function peerIdentity(request: Request): string {
  return peers.get(request)?.identity ?? "";
}
