// A role says in its log, once, when its own certificate enters the warning window (expiryWarningMs: 14 days, or a
// sixth of its life when shorter) and again when it has expired, so an operator who reads logs, not dashboards,
// still sees it coming (issue 21). A reloaded certificate starts the watch afresh.
import { X509Certificate } from "node:crypto";
import type { Logger } from "../ops/log.ts";
import type { Identity } from "../platform/tls.ts";
import { expiryWarningMs } from "./host-facts.ts";

/** setTimeout's longest delay (about 24.8 days); a later moment is reached in steps of at most this. */
const LONGEST_TIMER_MS = 2 ** 31 - 1;

/** When a certificate is warned about, and when it runs out (ms since the epoch). */
export function expiryMoments(identity: Identity): { warnAt: number; expiresAt: number } {
  const x509 = new X509Certificate(identity.cert);
  const [notBefore, notAfter] = [Date.parse(x509.validFrom), Date.parse(x509.validTo)];
  return { warnAt: notAfter - expiryWarningMs(notBefore, notAfter), expiresAt: notAfter };
}

/** Watches the identity in force; `restart` after a reload. Timers never hold the process open. */
export class ExpiryWatch {
  #timer: ReturnType<typeof setTimeout> | undefined;

  constructor(
    private readonly logger: Logger,
    private readonly now: () => number = Date.now,
  ) {}

  restart(identity: Identity): this {
    this.stop();
    const { warnAt, expiresAt } = expiryMoments(identity);
    const expires = new Date(expiresAt).toISOString();
    const step = () => {
      const now = this.now();
      if (now >= expiresAt) {
        this.logger.error(`certificate expired at ${expires}: peers refuse it; renew it (issue 21)`);
        return;
      }
      if (now >= warnAt && !warned) {
        warned = true;
        this.logger.warn(`certificate expires at ${expires}, in ${Math.ceil((expiresAt - now) / 60_000)} min: renew it (issue 21)`);
      }
      const next = (warned ? expiresAt : warnAt) - now;
      this.#timer = setTimeout(step, Math.min(Math.max(next, 0), LONGEST_TIMER_MS));
      this.#timer.unref?.();
    };
    let warned = false;
    step();
    return this;
  }

  stop(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
  }
}
