// The one prologue of every role that serves over mutual TLS: the environment guard, the configuration, the trust
// material and the policy, the listener, reloads and signals. A role file says what is its own (its flags, its app,
// what it opens and closes) and reads top-down as config, app, main.
import { Authorizer, mutualTlsListening, TrustMaterial } from "../authz/index.ts";
import { exitOnSignals, exitWithConfigError } from "../platform/config.ts";
import { describeError, createLogger, type Logger } from "../ops/log.ts";
import { Metrics } from "../ops/metrics.ts";
import { listenReloadable, type ReloadableListener, type ServableApp } from "../platform/http.ts";
import { assertSafeTlsEnvironment, type Identity } from "../platform/tls.ts";

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
}

/**
 * Runs a serving role: checks the environment before anything reads a key, parses its configuration, opens its
 * trust material and policy, builds its service, listens with mutual TLS, reloads certificates, CRL and policy on
 * change and on SIGHUP, and on SIGTERM/SIGINT stops listening before it closes what the role opened.
 */
export async function runRole<C extends ServingConfig>(role: RoleDefinition<C>, argv = process.argv.slice(2)): Promise<void> {
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
  const service = await Promise.resolve(role.start({ config, logger, metrics, trust, authz })).catch((error) => exitWithConfigError(role.name, error));
  const listener = await listenReloadable(service.app, {
    port: config.port, hostname: config.host, ...mutualTlsListening(trust, authz), sharePort: service.sharePort === true,
  }).catch((error) => exitWithConfigError(role.name, error));
  // Revocation needs no swap: it is asked at every handshake and on every request.
  trust.onReload(async (identity, changed) => {
    if (!changed.certificate) return;
    await service.onCertificate?.(identity);
    await listener.reload(mutualTlsListening(trust).tls).catch((error: unknown) => logger.error(`TLS listener kept its old material: ${describeError(error)}`));
  }).watch(logger);
  authz.watch();
  const stop = async () => {
    trust.stop();
    authz.stop();
    await listener.stop();
    await service.close?.();
  };
  await Promise.resolve(service.listening?.(listener.port, { listener, shutdown: () => void stop().finally(() => process.exit(0)) }))
    .catch((error) => exitWithConfigError(role.name, error));
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
