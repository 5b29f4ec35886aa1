// The one prologue of every role that serves over mutual TLS: the environment guard, the configuration, the trust
// material and the policy, the listener, reloads and signals. A role file says what is its own (its flags, its app,
// what it opens and closes) and reads top-down as config, app, main.
import { drain } from "../platform/drain.ts";
import { Authorizer, mutualTlsListening, RequestLimiter, TrustMaterial } from "../authz/index.ts";
import { exitOnSignals, exitWithConfigError } from "../platform/config.ts";
import { describeError, createLogger, type Logger } from "../ops/log.ts";
import { Metrics } from "../ops/metrics.ts";
import { listenReloadable, type ReloadableListener, type ServableApp } from "../platform/http.ts";
import { assertSafeTlsEnvironment, type Identity } from "../platform/tls.ts";
import { checkHost, formatCheck, type HostCheckInput } from "./host-check.ts";
import { ExpiryWatch } from "./expiry-watch.ts";
import { exportCertificateExpiry, hostFacts, type HostFacts } from "./host-facts.ts";

/** What runRole needs of every role's configuration. */
export interface ServingConfig {
  port: number;
  host: string;
  pki: string;
  policy: string;
  /** --no-crl: no revocation at all (issue 18). */
  noCrl: boolean;
}

/** What a role has when it builds its service. */
export interface RoleContext<C extends ServingConfig> {
  config: C;
  logger: Logger;
  metrics: Metrics;
  trust: TrustMaterial;
  authz: Authorizer;
  /** Per-identity requests in flight and rate, from the policy's limits (issue 20): the app says whose each request is. */
  limiter: RequestLimiter;
  /** What this host says about itself on /health (issue 23): identity, policy hash, CRL number, expiry, clock. */
  facts: () => HostFacts;
}

/** A role's own part, built once the shared prologue has its configuration, trust material and policy. */
export interface RoleService {
  /** An app made by createApp, given the role's logger and metrics. */
  app: ServableApp;
  /** Who the listening line says listens (default: the role's name), e.g. "coordinator worker 2 (pid 123)". */
  label?: string;
  /** Said in the listening line, after the address: the store, the policy, … */
  describe?: string;
  /** Share the port with sibling workers (a coordinator worker). */
  sharePort?: boolean;
  /** A new certificate, key or CA: swap outbound TLS, proof verifiers, … (the listener is swapped after it). */
  onCertificate?(identity: Identity): unknown;
  /** Everything the role opened, closed after its listener (stores, clients, watchers). */
  close?(): unknown;
  /** The listener is up, on `port` (the bound one, when the role asked for 0); `shutdown` stops the role and exits. */
  listening?(port: number, role: { listener: ReloadableListener; shutdown: () => void }): unknown;
}

export interface RoleDefinition<C extends ServingConfig> {
  /** The role's name: its log lines' and its one-line errors' prefix. */
  name: string;
  /** Its certificate's name in the PKI (default: the role's name). */
  certificate?: string;
  /** Flags, config file and environment to a configuration; throws ConfigError (one line, exit 2). */
  parse(argv: string[]): C;
  /** Builds the role's own part; a ConfigError it throws stops the role with one line. */
  start(context: RoleContext<C>): Promise<RoleService> | RoleService;
  /** What `check` looks at beyond the certificate, CRL and policy: Fernet keys, the database, peers. */
  check?(config: C): Pick<HostCheckInput, "fernet" | "store" | "peers">;
}

/** Flags only `check` takes, before the role's own: `--peer URL`, repeatable or comma-separated. */
function splitCheckFlags(argv: readonly string[]): { peers: string[]; rest: string[] } {
  const peers: string[] = [];
  const rest: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === "--peer" && i + 1 < argv.length) peers.push(...argv[++i]!.split(",").filter(Boolean));
    else if (arg.startsWith("--peer=")) peers.push(...arg.slice(7).split(",").filter(Boolean));
    else rest.push(arg);
  }
  return { peers, rest };
}

/**
 * `roles/<role>.ts check [--peer URL…] [the role's flags]`: the host check (host-check.ts) on the configuration the
 * role would run with. Exit 0: nothing wrong; 1: a problem; 2: the configuration does not parse.
 */
export async function checkRole<C extends ServingConfig>(
  role: Pick<RoleDefinition<C>, "name" | "certificate" | "parse" | "check">,
  argv: readonly string[],
): Promise<never> {
  const { peers, rest } = splitCheckFlags(argv);
  let config: C;
  try {
    assertSafeTlsEnvironment();
    config = role.parse(rest);
  } catch (error) {
    exitWithConfigError(role.name, error);
  }
  const extra = role.check?.(config) ?? {};
  const lines = await checkHost({
    role: role.name,
    certificate: role.certificate ?? role.name,
    pki: config.pki,
    host: config.host,
    policy: config.policy,
    noCrl: config.noCrl,
    ...extra,
    peers: [...(extra.peers ?? []), ...peers],
  });
  console.log(formatCheck(role.name, lines));
  process.exit(lines.some((l) => l.status === "FAIL") ? 1 : 0);
}

/**
 * Runs a serving role: checks the environment before anything reads a key, parses its configuration, opens its
 * trust material and policy, builds its service, listens with mutual TLS, reloads certificates, CRL and policy on
 * change and on SIGHUP, and on SIGTERM/SIGINT stops listening before it closes what the role opened.
 */
export async function runRole<C extends ServingConfig>(role: RoleDefinition<C>, argv = process.argv.slice(2)): Promise<void> {
  if (argv[0] === "check") return checkRole(role, argv.slice(1));
  const logger = createLogger(role.name);
  const metrics = new Metrics();
  let config: C;
  let trust: TrustMaterial;
  let authz: Authorizer;
  try {
    assertSafeTlsEnvironment();
    config = role.parse(argv);
    trust = TrustMaterial.open(config.pki, role.certificate ?? role.name, { noCrl: config.noCrl });
    authz = new Authorizer(config.policy, logger, metrics);
  } catch (error) {
    exitWithConfigError(role.name, error);
  }
  exportCertificateExpiry(metrics, () => trust.identity);
  const service = await Promise.resolve(
    role.start({
      config,
      logger,
      metrics,
      trust,
      authz,
      facts: hostFacts(trust, authz),
      limiter: new RequestLimiter({ limits: (identity) => authz.limits(identity), logger, metrics }),
    }),
  ).catch((error) => exitWithConfigError(role.name, error));
  const listener = await listenReloadable(service.app, {
    port: config.port,
    hostname: config.host,
    ...mutualTlsListening(trust, authz),
    sharePort: service.sharePort === true,
  }).catch((error) => exitWithConfigError(role.name, error));
  const expiry = new ExpiryWatch(logger).restart(trust.identity);
  // Revocation needs no swap: it is asked at every handshake and on every request.
  trust
    .onReload(async (identity, changed) => {
      if (!changed.certificate) return;
      expiry.restart(identity);
      await service.onCertificate?.(identity);
      await listener
        .reload(mutualTlsListening(trust).tls)
        .catch((error: unknown) => logger.error(`TLS listener kept its old material: ${describeError(error)}`));
    })
    .watch(logger);
  authz.watch();
  // SIGTERM drains (drain.ts): health fails first, accepting stops once callers have taken this process out, requests
  // in flight finish within the deadline; then the role's own resources close.
  const stop = async () => {
    expiry.stop();
    trust.stop();
    authz.stop();
    await drain(listener, logger);
    await service.close?.();
    logger.info(`${service.label ?? role.name} stopped`);
  };
  await Promise.resolve(service.listening?.(listener.port, { listener, shutdown: () => void stop().finally(() => process.exit(0)) })).catch((error) =>
    exitWithConfigError(role.name, error),
  );
  logger.info(`${service.label ?? role.name} listening on https://${config.host}:${listener.port}${service.describe ? ` (${service.describe})` : ""}`);
  exitOnSignals(stop);
}

/**
 * The environment guard, then the configuration, or one line and exit 2: for a role that must read its configuration
 * before it knows how to run (the coordinator, as a supervisor of workers or one coordinator).
 */
export function readConfig<C>(name: string, parse: (argv: string[]) => C, argv = process.argv.slice(2)): C {
  try {
    assertSafeTlsEnvironment();
    return parse(argv);
  } catch (error) {
    return exitWithConfigError(name, error);
  }
}
