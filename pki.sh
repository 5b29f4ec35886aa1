#!/usr/bin/env bash
# Builds securemesh's PKI: one CA, one certificate per identity, the CRL, and the shared Fernet key.
#
#   ./pki.sh                         the demo on one machine: in an empty folder a CA, crl.pem, encryption_key.txt
#                                    and the demo's localhost identities; later runs add what is missing, keep the rest
#   ./pki.sh init                    a deployment's CA host: the CA, crl.pem and encryption_key.txt, no identities
#   ./pki.sh issue NAME KIND         add one identity; KIND is one of
#            --client --server --coordinator --keyserver --secureproxy --marketplace (--both: kind "service")
#            [--san DNS:host,IP:addr ...] [--not-before YYYYMMDDHHMMSSZ] [--not-after YYYYMMDDHHMMSSZ]
#            [--force: reissue NAME under the same CA]. Writes crl.pem and encryption_key.txt if missing.
#   ./pki.sh bundle NAME DIR         what NAME's host needs, into DIR (made 0700): ca_cert.pem, crl.pem,
#            [--fernet] [--as ROLE]  NAME_cert.pem, NAME_key.pem (0600), with --fernet encryption_key.txt (0600);
#                                    --as server names the pair server_cert.pem/server_key.pem, the files a role
#                                    loads. Never ca_key.pem: copy DIR to the host as its PKI folder.
#   ./pki.sh list                    every certificate the CA issued: name, serial, not-after, status, SPIFFE ID, SANs
#   ./pki.sh revoke NAME [--all]     revoke NAME's current certificate (the one in NAME_cert.pem), or with --all
#                                    every one still valid under that name, and rewrite crl.pem
#   ./pki.sh revoke --serial HEX     revoke one certificate by serial (as list shows it; any case, colons allowed)
#   ./pki.sh crl                     re-sign crl.pem with the next CRL number and a fresh nextUpdate: run it on
#                                    the CA host well before nextUpdate (cron, daily), then copy crl.pem to every host
#   ./pki.sh fernet add|promote|retire|status [--ttl S] [--key FP] [--force]
#                                    rotate encryption_key.txt in three steps (shared/request-path/fernet-keys.ts;
#                                    ./pki.sh fernet --help says more); servers re-encrypt stored records to the new
#                                    key and keep a retired one until none is under it (/health fernet_rewrap);
#                                    retire archives each key it drops in fernet-archive/ (0600, folder 0700)
#   ./pki.sh fernet restore FP       put the archived key FP back, decrypt-only, for records still under it
#   --rsa                            RSA-2048 keys instead of ECDSA P-256
#   --new-ca                         make a CA where one is expected but missing (see below)
#   --force --new-ca                 regenerate everything: a new CA, new identities, a new encryption_key.txt
#
# No command makes a CA where one is expected: a folder that holds a *.pem, ca_db/ or encryption_key.txt but not
# both ca_cert.pem and ca_key.pem belongs to a role host (or a CA host that lost its key), and every command that
# would make a CA there refuses unless given --new-ca; crl, revoke, list and bundle never make one. --force alone
# never replaces a CA. A CA made by init (or by a first issue) gets no demo identities from a later plain run.
# In list, "current" marks the certificate NAME_cert.pem holds: the one `revoke NAME` revokes. Running roles
# reload crl.pem within seconds of a revoke.
#
# crl.pem lives CRL_DAYS days (default 30). Roles refuse to start without a valid one (unless --no-crl), and keep
# the one in force when a reload finds it missing, older, expired or unsigned. A plain run or init writes it when
# missing and re-signs it when it is past half its life, has no number or nextUpdate, outlives CRL_DAYS, or is not
# this CA's; a new CA gets an empty, numbered CRL at once.
#
# Each leaf names its identity twice: CN=NAME, and a URI SAN spiffe://securemesh/KIND/NAME that the
# policy (roles/policy.json) refers to. --san (repeatable, or a comma list) gives it the host names and
# addresses it serves on, checked by every peer that connects to it; without it a serving identity gets
# DNS:localhost,IP:127.0.0.1,IP:::1 and a client DNS:NAME. Output goes to $PKI_DIR, or certs/ beside this script.
set -euo pipefail
# Everything this script creates is private until it says otherwise (chmod 644 for certificates and the CRL): a key
# or encryption_key.txt is never readable by others, not even between its creation and a chmod.
umask 077

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

command -v openssl >/dev/null 2>&1 || { echo "pki.sh: openssl not found; install it (apt-get install openssl)" >&2; exit 1; }

here=$(cd "$(dirname "$0")" && pwd)
dir=${PKI_DIR:-$here/certs}

# ./pki.sh fernet add|promote|retire|status|restore FP [--ttl S] [--key FP] [--force]
if [ "${1:-}" = fernet ]; then
  shift
  bun=$here/node_modules/.bin/bun
  [ -x "$bun" ] || bun=$(command -v bun) || { echo "pki.sh: bun not found; run npm ci" >&2; exit 1; }
  exec "$bun" "$here/shared/request-path/fernet-keys.ts" "$@" --pki "$dir"
fi
crl_days=${CRL_DAYS:-30}
[[ "$crl_days" =~ ^[1-9][0-9]{0,4}$ ]] || { echo "pki.sh: CRL_DAYS must be a whole number of days from 1 to 99999, not '$crl_days'" >&2; exit 2; }
force=0
new_ca=0
key_type=ec
issue_kind=""
not_before=""
not_after=""
san_args=()
serial_arg=""
serial_given=0
revoke_all=0
fernet=0
bundle_as=""
positional=()

# A flag's value: the next argument, which must be there (an empty one is the flag's own check to refuse).
needs_value() { # flag count
  [ "$2" -ge 2 ] || { echo "pki.sh: $1 needs a value (see ./pki.sh --help)" >&2; exit 2; }
}

while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=1 ;;
    --new-ca) new_ca=1 ;;
    --rsa) key_type=rsa ;;
    --client|--server|--both|--coordinator|--keyserver|--secureproxy|--marketplace) issue_kind=${1#--} ;;
    --all) revoke_all=1 ;;
    --fernet) fernet=1 ;;
    --serial) needs_value "$1" $#; shift; serial_given=1; serial_arg=$1 ;;
    --as) needs_value "$1" $#; shift; bundle_as=$1 ;;
    --not-before) needs_value "$1" $#; shift; not_before=$1 ;;
    --not-after) needs_value "$1" $#; shift; not_after=$1 ;;
    --san) needs_value "$1" $#; shift; san_args+=("$1") ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "pki.sh: unknown argument '$1' (see ./pki.sh --help)" >&2; exit 2 ;;
    *) positional+=("$1") ;;
  esac
  shift
done

# The command and its operands: `issue NAME`, `revoke NAME`, `bundle NAME DIR`; the others take none.
action=${positional[0]:-all}
issue_name=${positional[1]:-}
bundle_dir=${positional[2]:-}
operands=0
case "$action" in
  all) operands=0 ;;
  init|crl|list) operands=1 ;;
  issue|revoke) operands=2 ;;
  bundle) operands=3 ;;
  *) echo "pki.sh: unknown argument '$action' (see ./pki.sh --help)" >&2; exit 2 ;;
esac
[ "$action" = all ] || [ "${#positional[@]}" -le "$operands" ] || { echo "pki.sh: unknown argument '${positional[$operands]}' (see ./pki.sh --help)" >&2; exit 2; }
case "$action" in
  issue) [ -n "$issue_name" ] || { echo "pki.sh: issue needs a NAME" >&2; exit 2; } ;;
  revoke)
    [ -n "$issue_name" ] || [ "$serial_given" = 1 ] || { echo "pki.sh: revoke needs a NAME or --serial HEX (./pki.sh list shows both)" >&2; exit 2; }
    [ -z "$issue_name" ] || [ "$serial_given" = 0 ] || { echo "pki.sh: revoke takes a NAME or --serial HEX, not both" >&2; exit 2; }
    [ "$revoke_all" = 0 ] || [ -n "$issue_name" ] || { echo "pki.sh: --all goes with 'revoke NAME'" >&2; exit 2; } ;;
  bundle) [ -n "$issue_name" ] && [ -n "$bundle_dir" ] || { echo "pki.sh: bundle needs a NAME and a folder: ./pki.sh bundle NAME DIR [--fernet] [--as ROLE]" >&2; exit 2; } ;;
esac
# Flags that only one command reads are refused elsewhere, so a mistyped command never does something else.
[ "$serial_given" = 0 ] || [ "$action" = revoke ] || { echo "pki.sh: --serial goes with 'revoke' (see ./pki.sh --help)" >&2; exit 2; }
[ "$revoke_all" = 0 ] || [ "$action" = revoke ] || { echo "pki.sh: --all goes with 'revoke NAME' (see ./pki.sh --help)" >&2; exit 2; }
[ "$fernet" = 0 ] && [ -z "$bundle_as" ] || [ "$action" = bundle ] || { echo "pki.sh: --fernet and --as go with 'bundle NAME DIR' (see ./pki.sh --help)" >&2; exit 2; }
case "$action" in
  all|init|issue) ;;
  *)
    [ "$force" = 0 ] || { echo "pki.sh: --force goes with a plain run, init or 'issue NAME' (see ./pki.sh --help)" >&2; exit 2; }
    [ "$new_ca" = 0 ] || { echo "pki.sh: --new-ca goes with a plain run, init or 'issue NAME'; $action never makes a CA" >&2; exit 2; } ;;
esac
# NAME becomes file names (NAME_cert.pem, NAME_key.pem) beside the CA's own: "ca" would overwrite ca_key.pem.
check_name() { # what value
  [[ "$2" =~ ^[A-Za-z0-9_-]+$ ]] || { echo "pki.sh: $1 may hold letters, digits, - and _ only" >&2; exit 2; }
  [ "$2" != ca ] || { echo "pki.sh: $1 'ca' is the CA's own (ca_cert.pem, ca_key.pem); choose another name" >&2; exit 2; }
}
[ -z "$issue_name" ] || check_name NAME "$issue_name"
[ -z "$bundle_as" ] || check_name "--as" "$bundle_as"

is_ipv4() { # addr: four decimal octets 0-255, no leading zeros
  local IFS=. octet octets
  [[ "$1" =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || return 1
  read -r -a octets <<<"$1"
  for octet in "${octets[@]}"; do
    [[ "$octet" =~ ^(0|[1-9][0-9]*)$ ]] && [ "$octet" -le 255 ] || return 1
  done
}

is_ipv6() { # addr: eight groups of 1-4 hex digits, or fewer around one "::"; the last two may be an IPv4 address
  local addr=$1 groups=8 head tail part count=0
  [[ "$addr" =~ ^[0-9A-Fa-f:.]+$ ]] || return 1
  if [[ "$addr" == *.* ]]; then
    is_ipv4 "${addr##*:}" || return 1
    addr="${addr%:*}:0:0"
  fi
  if [[ "$addr" == *::* ]]; then
    head=${addr%%::*}; tail=${addr#*::}
    [[ "$tail" != *::* ]] || return 1
    groups=7 # "::" stands for at least one group
  else
    head=$addr; tail=""
  fi
  local IFS=:
  for part in $head; do [[ "$part" =~ ^[0-9A-Fa-f]{1,4}$ ]] || return 1; count=$((count + 1)); done
  for part in $tail; do [[ "$part" =~ ^[0-9A-Fa-f]{1,4}$ ]] || return 1; count=$((count + 1)); done
  [[ "$head" != :* && "$head" != *: && "$tail" != :* && "$tail" != *: ]] || return 1
  if [ "$groups" = 8 ]; then [ "$count" = 8 ]; else [ "$count" -le 7 ]; fi
}

is_dns_name() { # name: dot-separated labels of letters, digits and inner hyphens, 1-63 each, 253 in all
  [ "${#1}" -le 253 ] && [[ "$1" =~ ^([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$ ]]
}

# The --san values as one list, each checked: they go into the certificate's extension file verbatim, so
# nothing but a DNS name or an IP address may pass (no commas, spaces or other openssl syntax).
host_sans=""
dns_count=0
ip_count=0
san_items=()
declare -A san_seen=()
for arg in "${san_args[@]+"${san_args[@]}"}"; do
  [ -n "$arg" ] || { echo "pki.sh: --san needs a value such as DNS:server1.example,IP:10.0.0.5" >&2; exit 2; }
  [[ "$arg" != *$'\n'* ]] || { echo "pki.sh: --san must be one line" >&2; exit 2; }
  IFS=, read -r -a parts <<<"$arg,"
  [[ "$arg" != *,,* && "$arg" != ,* && "$arg" != *, ]] || { echo "pki.sh: --san '$arg' has an empty entry; write DNS:name or IP:address between the commas" >&2; exit 2; }
  for item in "${parts[@]}"; do
    case "$item" in
      DNS:*)
        value=${item#DNS:}
        [[ "$value" != \** ]] || { echo "pki.sh: --san '$item': wildcard names are not issued; name each host" >&2; exit 2; }
        # A client connecting to an address checks the IP SANs only: an address as a DNS name never matches.
        ! is_ipv4 "$value" || { echo "pki.sh: --san '$item' is an address; write IP:$value" >&2; exit 2; }
        is_dns_name "$value" || { echo "pki.sh: --san '$item' is not a DNS name (letters, digits, inner hyphens, dot-separated labels)" >&2; exit 2; }
        item="DNS:${value,,}" ;;
      IP:*)
        value=${item#IP:}
        is_ipv4 "$value" || is_ipv6 "$value" || { echo "pki.sh: --san '$item' is not an IPv4 or IPv6 address" >&2; exit 2; }
        item="IP:${value,,}" ;;
      *) echo "pki.sh: --san '$item': each entry is DNS:name or IP:address" >&2; exit 2 ;;
    esac
    [ -z "${san_seen[$item]:-}" ] || continue
    san_seen[$item]=1
    san_items+=("$item")
    if [[ "$item" == DNS:* ]]; then dns_count=$((dns_count + 1)); else ip_count=$((ip_count + 1)); fi
  done
done
if [ "${#san_items[@]}" -gt 0 ]; then
  [ "$action" = issue ] || { echo "pki.sh: --san goes with 'issue NAME' (see ./pki.sh --help)" >&2; exit 2; }
  host_sans=$(IFS=,; echo "${san_items[*]}")
fi

new_key() { # path
  if [ "$key_type" = rsa ]; then
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$1" 2>/dev/null
  else
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
  fi
  chmod 600 "$1"
}

make_ca() {
  new_key "$dir/ca_key.pem"
  openssl req -x509 -new -key "$dir/ca_key.pem" -sha256 -days 3650 \
    -subj "/O=securemesh/CN=securemesh CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -out "$dir/ca_cert.pem" 2>/dev/null
  chmod 644 "$dir/ca_cert.pem"
  rm -rf "$dir/ca_db" "$dir/crl.pem"
  write_crl # roles refuse to start without a CRL: a new CA has an empty, numbered one at once
}

# openssl ca keeps an index of what it issued, which revocation and the CRL need.
ensure_ca_db() {
  mkdir -p "$dir/ca_db"
  [ -f "$dir/ca_db/index.txt" ] || : >"$dir/ca_db/index.txt"
  [ -f "$dir/ca_db/crlnumber" ] || echo 1000 >"$dir/ca_db/crlnumber"
  cat >"$dir/ca_db/ca.cnf" <<EOF
[ ca ]
default_ca = securemesh_ca
[ securemesh_ca ]
database = $dir/ca_db/index.txt
new_certs_dir = $dir/ca_db
certificate = $dir/ca_cert.pem
private_key = $dir/ca_key.pem
crlnumber = $dir/ca_db/crlnumber
rand_serial = yes
default_md = sha256
default_crl_days = $crl_days
policy = policy_any
unique_subject = no
copy_extensions = none
[ policy_any ]
organizationName = optional
commonName = supplied
EOF
}

# The trust domain of every SPIFFE ID this PKI issues.
trust_domain=securemesh

# kind decides the EKU and the SPIFFE path. Anything that serves gets the loopback SANs, clients a DNS SAN
# with their name, unless --san names the hosts. The coordinator and the SecureProxy both serve and call
# onward, so they get both EKUs.
make_leaf() { # name kind
  local name=$1 kind=$2 eku sans usage ext spiffe_kind=$2
  case "$kind" in
    server|keyserver|marketplace) eku=serverAuth ;;
    client) eku=clientAuth ;;
    coordinator|secureproxy) eku=serverAuth,clientAuth ;;
    both) eku=serverAuth,clientAuth; spiffe_kind=service ;;
    *) echo "pki.sh: identity kind must be --client, --server, --coordinator, --keyserver, --secureproxy, --marketplace or --both" >&2; exit 2 ;;
  esac
  if [ -n "$host_sans" ]; then
    sans=$host_sans
    # Addresses alone, no DNS name: a TLS client would then match a host name against the CN (NAME), as Bun's fetch
    # does (found by attack on #14). One name no host can have (.invalid, RFC 2606) turns that fallback off (RFC 6125).
    [ "$dns_count" -gt 0 ] || sans="$sans,DNS:$name.invalid"
  elif [ "$kind" = client ]; then sans="DNS:$name"
  else sans="DNS:localhost,IP:127.0.0.1,IP:::1"; fi
  sans="URI:spiffe://$trust_domain/$spiffe_kind/$name,$sans"
  usage=digitalSignature
  [ "$key_type" = rsa ] && usage=digitalSignature,keyEncipherment
  new_key "$dir/${name}_key.pem"
  ext=$(mktemp)
  cat >"$ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,$usage
extendedKeyUsage=$eku
subjectAltName=$sans
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
EOF
  local dates=(-days 397)
  [ -n "$not_before" ] && dates+=(-startdate "$not_before")
  [ -n "$not_after" ] && dates=(-enddate "$not_after") && [ -n "$not_before" ] && dates+=(-startdate "$not_before")
  ensure_ca_db
  openssl req -new -key "$dir/${name}_key.pem" -subj "/O=securemesh/CN=$name" -out "$dir/${name}.csr" 2>/dev/null
  if ! openssl ca -batch -config "$dir/ca_db/ca.cnf" -extfile "$ext" -notext "${dates[@]}" \
      -in "$dir/${name}.csr" -out "$dir/${name}_cert.pem" >/dev/null 2>"$ext.err"; then
    echo "pki.sh: issuing $name failed: $(tail -1 "$ext.err")" >&2
    rm -f "$ext" "$ext.err" "$dir/${name}.csr"
    exit 1
  fi
  rm -f "$ext" "$ext.err" "$dir/${name}.csr"
  chmod 644 "$dir/${name}_cert.pem"
}

# The CRL number of a CRL file as hex digits, or nothing when it has none or does not parse.
crl_number() { # path
  { openssl crl -in "$1" -noout -crlnumber 2>/dev/null || true; } | sed -n 's/^crlNumber=\(0x\)\{0,1\}\([0-9A-Fa-f]\{1,\}\)$/\2/p'
}

# Writes crl.pem from the CA's index with the next CRL number, by rename (a role polling it never reads half a file).
write_crl() {
  ensure_ca_db
  # Roles refuse a lower number than the CRL they hold (an older CRL put back), so a lost or restored
  # ca_db/crlnumber must not take the number back below the CRL already out there.
  local current next
  current=$(crl_number "$dir/crl.pem")
  next=$(tr -d '[:space:]' <"$dir/ca_db/crlnumber")
  if [ -n "$current" ] && [ "${#current}" -le 15 ] && [[ "$next" =~ ^[0-9A-Fa-f]{1,15}$ ]] && (( 16#$current >= 16#$next )); then
    printf '%X\n' $((16#$current + 1)) >"$dir/ca_db/crlnumber"
  fi
  if ! openssl ca -batch -config "$dir/ca_db/ca.cnf" -gencrl -out "$dir/crl.pem.new" >/dev/null 2>"$dir/crl.pem.err"; then
    echo "pki.sh: signing crl.pem failed: $(tail -1 "$dir/crl.pem.err")" >&2
    rm -f "$dir/crl.pem.new" "$dir/crl.pem.err"
    exit 1
  fi
  rm -f "$dir/crl.pem.err"
  chmod 644 "$dir/crl.pem.new"
  mv -f "$dir/crl.pem.new" "$dir/crl.pem"
}

# "CRL number 0x1001, next update Jan  3 15:22:27 2027 GMT", for the lines that say a CRL was written.
describe_crl() {
  echo "CRL number 0x$(crl_number "$dir/crl.pem"), next update $(openssl crl -in "$dir/crl.pem" -noout -nextupdate | sed 's/^nextUpdate=//')"
}

# Why crl.pem needs re-signing, or nothing when it is fine: past half its life (so a daily or weekly run keeps
# roles ahead of nextUpdate), no number or nextUpdate (roles refuse both), longer-lived than CRL_DAYS (a shorter
# setting takes effect at once), or not signed by this CA.
crl_refresh_reason() {
  local file=$dir/crl.pem info last next now
  info=$(openssl crl -in "$file" -noout -lastupdate -nextupdate 2>/dev/null) || { echo "it does not parse"; return; }
  # openssl crl exits 0 after "verify failure": only its "verify OK" says the signature is this CA's.
  openssl crl -in "$file" -noout -CAfile "$dir/ca_cert.pem" 2>&1 | grep -x 'verify OK' >/dev/null || { echo "it is not signed by this CA"; return; }
  [ -n "$(crl_number "$file")" ] || { echo "it has no CRL number"; return; }
  last=$(sed -n 's/^lastUpdate=//p' <<<"$info")
  next=$(sed -n 's/^nextUpdate=//p' <<<"$info")
  [ -n "$next" ] && [ "$next" != NONE ] || { echo "it has no nextUpdate"; return; }
  last=$(date -u -d "$last" +%s) && next=$(date -u -d "$next" +%s) || { echo "its dates do not parse"; return; }
  now=$(date -u +%s)
  if [ "$now" -ge $(((last + next) / 2)) ]; then echo "it is past half its life"
  elif [ "$next" -gt $((now + crl_days * 86400)) ]; then echo "it outlives CRL_DAYS=$crl_days"
  fi
}

# Whether the certificate names exactly the --san hosts: as many DNS names and addresses, and each one matches
# (openssl's own comparison, so ::1 and 0:0:0:0:0:0:0:1 are one address).
has_host_sans() { # cert
  local text item found_dns found_ip
  text=$(openssl x509 -in "$1" -noout -ext subjectAltName 2>/dev/null | tail -n +2)
  found_dns=$(grep -o 'DNS:' <<<"$text" | wc -l)
  found_ip=$(grep -o 'IP Address:' <<<"$text" | wc -l)
  local want_dns=$dns_count
  [ "$want_dns" -gt 0 ] || want_dns=1 # the .invalid name an address-only certificate gets
  [ "$found_dns" -eq "$want_dns" ] && [ "$found_ip" -eq "$ip_count" ] || return 1
  for item in "${san_items[@]}"; do
    if [[ "$item" == DNS:* ]]; then
      openssl x509 -in "$1" -noout -checkhost "${item#DNS:}" 2>/dev/null | grep -q 'does match' || return 1
    else
      openssl x509 -in "$1" -noout -checkip "${item#IP:}" 2>/dev/null | grep -q 'does match' || return 1
    fi
  done
}

ensure_leaf() { # name kind
  if [ "$reissue" = 1 ] || [ ! -s "$dir/$1_cert.pem" ] || [ ! -s "$dir/$1_key.pem" ]; then
    make_leaf "$1" "$2"
    echo "pki.sh: issued $1 ($2${host_sans:+, $host_sans})"
  elif [ -n "$host_sans" ] && ! has_host_sans "$dir/$1_cert.pem"; then
    echo "pki.sh: $1 exists with other host names or addresses; add --force to reissue it for $host_sans" >&2
    exit 2
  fi
}

# crl.pem as a plain run or init leaves it: written when missing, re-signed when crl_refresh_reason says so.
ensure_crl() {
  if [ ! -s "$dir/crl.pem" ]; then
    write_crl
    echo "pki.sh: wrote crl.pem, $(describe_crl)"
  else
    local reason
    reason=$(crl_refresh_reason)
    if [ -n "$reason" ]; then
      write_crl
      echo "pki.sh: re-signed crl.pem ($reason), $(describe_crl)"
    fi
  fi
}

# The Fernet key: url-safe base64 of 32 random bytes (16 signing, 16 encryption). Written when missing; replaced
# only by --force --new-ca (data encrypted under the old key cannot be read with the new one).
ensure_fernet_key() {
  [ "$replace_fernet" = 1 ] || [ ! -s "$dir/encryption_key.txt" ] || return 0
  openssl rand 32 | openssl base64 -A | tr '+/' '-_' >"$dir/encryption_key.txt.new"
  echo >>"$dir/encryption_key.txt.new"
  chmod 600 "$dir/encryption_key.txt.new"
  mv -f "$dir/encryption_key.txt.new" "$dir/encryption_key.txt"
  echo "pki.sh: wrote encryption_key.txt"
}

has_ca() { [ -s "$dir/ca_cert.pem" ] && [ -s "$dir/ca_key.pem" ]; }

# What in the folder says a CA is expected here: certificates, keys, CRLs, the CA's database, the Fernet key.
pki_material() {
  local path
  for path in "$dir"/*.pem "$dir"/ca_db "$dir"/encryption_key.txt; do
    [ -e "$path" ] && echo "${path##*/}"
  done
  return 0
}

# "ca_cert.pem, crl.pem, server1_cert.pem and 4 more"
describe_files() { # name...
  local shown=("${@:1:3}")
  local text
  text=$(printf '%s, ' "${shown[@]}")
  text=${text%, }
  [ $# -le 3 ] || text="$text and $(($# - 3)) more"
  echo "$text"
}

# Serials as openssl's index has them: hex, upper case, no colons, even length; "" when it is not hex.
normal_serial() { # hex
  local s=${1//:/}
  s=${s#0[xX]}
  [[ "$s" =~ ^[0-9A-Fa-f]+$ ]] || return 0
  s=${s^^}
  s=$(sed 's/^0*//' <<<"$s")
  [ -n "$s" ] || s=0
  [ $((${#s} % 2)) = 0 ] || s="0$s"
  echo "$s"
}

# The index rows (status, revocation date or "-", serial, CN) of the certificates the CA issued, in issue order.
index_rows() {
  [ -f "$dir/ca_db/index.txt" ] || return 0
  awk -F'\t' 'NF >= 6 { cn = $6; sub(/^.*\/CN=/, "", cn); rev = $3; sub(/,.*$/, "", rev); print $1 "\t" (rev == "" ? "-" : rev) "\t" $4 "\t" cn }' "$dir/ca_db/index.txt"
}

serial_of() { # cert file
  openssl x509 -in "$1" -noout -serial 2>/dev/null | sed -n 's/^serial=//p'
}

# 261204163015Z (UTCTime, as index.txt holds revocation dates) or 20261204163015Z: 2026-12-04T16:30:15Z.
index_time() { # time
  local t=$1
  if [ "${#t}" = 13 ]; then
    if [ "${t:0:2}" -lt 50 ]; then t="20$t"; else t="19$t"; fi
  fi
  echo "${t:0:4}-${t:4:2}-${t:6:2}T${t:8:2}:${t:10:2}:${t:12:2}Z"
}

# Revokes the certificate the CA issued with this serial (index form), by its copy in ca_db/.
revoke_serial() { # serial
  local copy=$dir/ca_db/$1.pem
  [ -s "$copy" ] || { echo "pki.sh: the CA's copy of serial $1 ($copy) is missing, so openssl cannot revoke it" >&2; exit 1; }
  if ! openssl ca -batch -config "$dir/ca_db/ca.cnf" -revoke "$copy" >/dev/null 2>"$dir/ca_db/revoke.err"; then
    echo "pki.sh: revoking serial $1 failed: $(tail -1 "$dir/ca_db/revoke.err")" >&2
    rm -f "$dir/ca_db/revoke.err"
    exit 1
  fi
  rm -f "$dir/ca_db/revoke.err"
}

# A host with a copy of the PKI but not the CA key must never make a CA of its own (it would replace ca_cert.pem),
# and these commands only ever use the CA that is there.
case "$action" in
  crl|revoke|list|bundle)
    has_ca || { echo "pki.sh: $action needs the CA's certificate and key ($dir/ca_cert.pem, ca_key.pem): run it on the CA host" >&2; exit 2; } ;;
esac

reissue=$force # `issue NAME --force` reissues that one leaf under the same CA
replace_fernet=0
made_ca=0
if [ "$action" = all ] || [ "$action" = init ] || [ "$action" = issue ]; then
  if has_ca; then
    # --force once made a new CA: on a CA host that silently untrusted every host (issue 23).
    if [ "$force" = 1 ] && [ "$action" != issue ]; then
      [ "$new_ca" = 1 ] || { echo "pki.sh: --force would replace the CA in $dir, every certificate it issued and encryption_key.txt; add --new-ca to do that, or reissue one identity with ./pki.sh issue NAME --KIND --force" >&2; exit 2; }
      make_ca
      made_ca=1
      replace_fernet=1
      echo "pki.sh: replaced the CA in $dir (--force --new-ca), with an empty crl.pem ($(describe_crl)); no host trusts it until it gets the new ca_cert.pem"
    fi
  else
    mapfile -t found < <(pki_material)
    if [ "${#found[@]}" -gt 0 ] && [ "$new_ca" = 0 ]; then
      missing=$( { [ -s "$dir/ca_cert.pem" ] || echo ca_cert.pem; [ -s "$dir/ca_key.pem" ] || echo ca_key.pem; } | paste -sd' ' -)
      echo "pki.sh: no CA here: $dir holds $(describe_files "${found[@]}") but no ${missing/ / or }; on a role host copy its files from the CA host (./pki.sh bundle NAME DIR there), on the CA host restore ${missing/ / and } from a backup, or add --new-ca to make a new CA that no existing host trusts" >&2
      exit 2
    fi
    mkdir -p "$dir"
    make_ca
    made_ca=1
    [ "$force" = 0 ] || [ "$action" = issue ] || replace_fernet=1
    if [ "${#found[@]}" -gt 0 ]; then
      echo "pki.sh: created a new CA in $dir (--new-ca), with an empty crl.pem ($(describe_crl)); certificates issued before are not this CA's: issue again what a host needs"
    else
      echo "pki.sh: created CA in $dir, with an empty crl.pem ($(describe_crl))"
    fi
  fi
  if [ "$made_ca" = 1 ]; then
    reissue=1 # a new CA invalidates every leaf
    # A CA made for a deployment (init, or a first issue) never gets the demo's localhost identities from a plain run.
    [ "$action" = all ] || echo "$action" >"$dir/ca_db/deployment"
  fi
fi

if [ "$action" = revoke ]; then
  ensure_ca_db
  if [ "$serial_given" = 1 ]; then
    serial=$(normal_serial "$serial_arg")
    [ -n "$serial" ] || { echo "pki.sh: --serial '$serial_arg' is not a hex serial such as 4A:1B:… or 4a1b… (./pki.sh list shows each one)" >&2; exit 2; }
    row=$(index_rows | awk -F'\t' -v s="$serial" '{ t = $3; sub(/^0+/, "", t); u = s; sub(/^0+/, "", u); if (t == u) print }' | tail -1)
    [ -n "$row" ] || { echo "pki.sh: no certificate with serial $serial in $dir/ca_db/index.txt (./pki.sh list shows every serial)" >&2; exit 2; }
    IFS=$'\t' read -r status revoked serial name <<<"$row"
    [ "$status" != R ] || { echo "pki.sh: serial $serial ($name) is already revoked, since $(index_time "$revoked"); nothing to do" >&2; exit 2; }
    revoke_serial "$serial"
    write_crl
    which="an earlier certificate of that name"
    [ "$(serial_of "$dir/${name}_cert.pem")" != "$serial" ] || which="its current certificate, ${name}_cert.pem"
    echo "pki.sh: revoked serial $serial ($name, $which); wrote crl.pem, $(describe_crl) (running roles reload it within seconds)"
    exit 0
  fi
  mapfile -t valid < <(index_rows | awk -F'\t' -v n="$issue_name" '$4 == n && $1 != "R" { print $3 }')
  if [ "$revoke_all" = 1 ]; then
    [ "${#valid[@]}" -gt 0 ] || { echo "pki.sh: no certificate named $issue_name is still valid (./pki.sh list shows them all)" >&2; exit 2; }
    for serial in "${valid[@]}"; do revoke_serial "$serial"; done
    write_crl
    echo "pki.sh: revoked the ${#valid[@]} certificate(s) named $issue_name that were still valid (serials $(describe_files "${valid[@]}")); wrote crl.pem, $(describe_crl) (running roles reload it within seconds)"
    exit 0
  fi
  if [ ! -s "$dir/${issue_name}_cert.pem" ]; then
    others=""
    [ "${#valid[@]}" = 0 ] || others="; ${#valid[@]} certificate(s) named $issue_name are still valid: ./pki.sh revoke $issue_name --all, or --serial HEX from ./pki.sh list"
    echo "pki.sh: no certificate $dir/${issue_name}_cert.pem to revoke$others" >&2
    exit 2
  fi
  serial=$(serial_of "$dir/${issue_name}_cert.pem")
  row=$(index_rows | awk -F'\t' -v s="$serial" '$3 == s' | tail -1)
  [ -n "$row" ] || { echo "pki.sh: $dir/${issue_name}_cert.pem (serial $serial) was not issued by this CA; nothing revoked" >&2; exit 2; }
  IFS=$'\t' read -r status revoked _ _ <<<"$row"
  mapfile -t older < <(printf '%s\n' "${valid[@]+"${valid[@]}"}" | grep -vx "$serial" | grep . || true)
  others=""
  [ "${#older[@]}" = 0 ] || others="; ${#older[@]} earlier certificate(s) named $issue_name are still valid: ./pki.sh revoke $issue_name --all revokes them too"
  if [ "$status" = R ]; then
    # Kept from before: a second revoke of a name succeeds, re-signing the CRL (scripts that revoke twice still work).
    write_crl
    echo "pki.sh: $issue_name's current certificate (serial $serial) was already revoked, since $(index_time "$revoked"); wrote crl.pem, $(describe_crl)$others"
    exit 0
  fi
  revoke_serial "$serial"
  write_crl
  echo "pki.sh: revoked $issue_name (serial $serial, its current certificate ${issue_name}_cert.pem); wrote crl.pem, $(describe_crl) (running roles reload it within seconds)$others"
  exit 0
fi

if [ "$action" = crl ]; then
  write_crl
  echo "pki.sh: wrote crl.pem, $(describe_crl); copy it to every host (running roles reload it within seconds)"
  exit 0
fi

if [ "$action" = list ]; then
  mapfile -t rows < <(index_rows)
  if [ "${#rows[@]}" = 0 ]; then
    echo "pki.sh: the CA in $dir has issued no certificates yet"
    exit 0
  fi
  now=$(date -u +%s)
  {
    printf 'NAME\tSERIAL\tNOT AFTER\tSTATUS\tSPIFFE ID\tSANS\n'
    for row in "${rows[@]}"; do
      IFS=$'\t' read -r status revoked serial name <<<"$row"
      copy=$dir/ca_db/$serial.pem
      spiffe=- sans=- not_after=- state=valid
      if [ -s "$copy" ]; then
        info=$(openssl x509 -in "$copy" -noout -startdate -enddate -ext subjectAltName 2>/dev/null || true)
        start=$(date -u -d "$(sed -n 's/^notBefore=//p' <<<"$info")" +%s)
        end=$(date -u -d "$(sed -n 's/^notAfter=//p' <<<"$info")" +%s)
        not_after=$(date -u -d "@$end" +%Y-%m-%dT%H:%M:%SZ)
        # "URI:spiffe://…, DNS:a, IP Address:10.0.0.1" on the line after the extension's name.
        all_sans=$(grep -A1 'Subject Alternative Name' <<<"$info" | tail -1 | sed 's/^ *//; s/IP Address:/IP:/g; s/, /,/g')
        spiffe=$(tr , '\n' <<<"$all_sans" | sed -n 's/^URI://p' | head -1)
        sans=$(tr , '\n' <<<"$all_sans" | grep -v '^URI:' | paste -sd, -)
        [ -n "$spiffe" ] || spiffe=-
        [ -n "$sans" ] || sans=-
        if [ "$now" -ge "$end" ]; then state=expired; elif [ "$now" -lt "$start" ]; then state="not yet valid"; fi
      fi
      [ "$status" != R ] || state="revoked $(index_time "$revoked")"
      [ "$(serial_of "$dir/${name}_cert.pem")" != "$serial" ] || state="$state, current"
      printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$serial" "$not_after" "$state" "$spiffe" "$sans"
    done
  } | awk -F'\t' '{ for (i = 1; i <= NF; i++) { cell[NR, i] = $i; if (length($i) > width[i]) width[i] = length($i) } rows = NR; cols = NF }
    END { for (r = 1; r <= rows; r++) { line = ""; for (i = 1; i < cols; i++) line = line sprintf("%-" width[i] "s  ", cell[r, i]); print line cell[r, cols] } }'
  exit 0
fi

if [ "$action" = bundle ]; then
  cert=$dir/${issue_name}_cert.pem
  key=$dir/${issue_name}_key.pem
  [ -s "$cert" ] && [ -s "$key" ] || { echo "pki.sh: no identity $issue_name in $dir (${issue_name}_cert.pem, ${issue_name}_key.pem) to bundle: issue it first (./pki.sh issue $issue_name --KIND --san …)" >&2; exit 2; }
  serial=$(serial_of "$cert")
  row=$(index_rows | awk -F'\t' -v s="$serial" '$3 == s' | tail -1)
  [ -n "$row" ] || { echo "pki.sh: $cert (serial $serial) was not issued by this CA; issue it again (./pki.sh issue $issue_name --KIND --san … --force)" >&2; exit 2; }
  [ "${row%%$'\t'*}" != R ] || { echo "pki.sh: $issue_name's current certificate (serial $serial) is revoked; issue it again (./pki.sh issue $issue_name --KIND --san … --force)" >&2; exit 2; }
  openssl verify -CAfile "$dir/ca_cert.pem" "$cert" >/dev/null 2>&1 || { echo "pki.sh: $cert does not verify against this CA (expired, or not yet valid?); issue it again (./pki.sh issue $issue_name --KIND --san … --force)" >&2; exit 2; }
  [ "$(openssl x509 -in "$cert" -noout -pubkey)" = "$(openssl pkey -in "$key" -pubout 2>/dev/null)" ] || { echo "pki.sh: $key is not the key of $cert; issue it again (./pki.sh issue $issue_name --KIND --san … --force)" >&2; exit 2; }
  as=${bundle_as:-$issue_name}
  # What the host gets, and how readable: never ca_key.pem, the Fernet key only when asked for.
  files=("ca_cert.pem:ca_cert.pem:644" "crl.pem:crl.pem:644" "${issue_name}_cert.pem:${as}_cert.pem:644" "${issue_name}_key.pem:${as}_key.pem:600")
  [ "$fernet" = 0 ] || files+=("encryption_key.txt:encryption_key.txt:600")
  if [ -e "$bundle_dir" ]; then
    [ -d "$bundle_dir" ] || { echo "pki.sh: $bundle_dir is not a folder" >&2; exit 2; }
    [ "$(cd "$bundle_dir" && pwd -P)" != "$(cd "$dir" && pwd -P)" ] || { echo "pki.sh: bundle into a folder of its own, not the CA's ($dir)" >&2; exit 2; }
    # A folder that holds only this bundle's files is refreshed; anything else there would travel with it.
    for path in "$bundle_dir"/* "$bundle_dir"/.[!.]*; do
      [ -e "$path" ] || continue
      wanted=0
      for spec in "${files[@]}"; do
        rest=${spec#*:}
        [ "${path##*/}" != "${rest%%:*}" ] || wanted=1
      done
      [ "$wanted" = 1 ] || { echo "pki.sh: $bundle_dir already holds ${path##*/}, which a bundle of $issue_name does not: give an empty or new folder" >&2; exit 2; }
    done
  fi
  [ -s "$dir/crl.pem" ] || { write_crl; echo "pki.sh: wrote crl.pem, $(describe_crl)"; }
  [ "$fernet" = 0 ] || ensure_fernet_key
  mkdir -p "$bundle_dir"
  names=()
  for spec in "${files[@]}"; do
    from=${spec%%:*}; rest=${spec#*:}; to=${rest%%:*}; mode=${rest#*:}
    install -m "$mode" "$dir/$from" "$bundle_dir/.$to.new"
    mv -f "$bundle_dir/.$to.new" "$bundle_dir/$to"
    names+=("$to")
  done
  echo "pki.sh: bundled $issue_name into $bundle_dir: ${names[*]} (no CA key); copy that folder to $issue_name's host as its PKI folder (--pki or PKI_DIR)"
  exit 0
fi

if [ "$action" = issue ]; then
  [ -n "$issue_kind" ] || { echo "pki.sh: issue $issue_name needs a kind: --client, --server, --coordinator, --keyserver, --secureproxy, --marketplace or --both" >&2; exit 2; }
  ensure_leaf "$issue_name" "$issue_kind"
  # What a deployment copies next to the new identity: present from the first command on a fresh CA host.
  [ -s "$dir/crl.pem" ] || { write_crl; echo "pki.sh: wrote crl.pem, $(describe_crl)"; }
  ensure_fernet_key
  exit 0
fi

if [ "$action" = init ]; then
  [ "$made_ca" = 1 ] || echo "pki.sh: kept the CA in $dir"
  ensure_crl
  ensure_fernet_key
  [ "$made_ca" = 0 ] || echo "pki.sh: no identities issued: ./pki.sh issue NAME --KIND --san … adds one, ./pki.sh bundle NAME DIR packs what its host needs"
  exit 0
fi

if [ -f "$dir/ca_db/deployment" ]; then
  # A deployment's CA host: the demo's localhost identities would be valid certificates nobody asked for (issue 23).
  echo "pki.sh: the CA in $dir was made for a deployment (by pki.sh $(head -1 "$dir/ca_db/deployment")): no demo identities issued; ./pki.sh issue NAME --KIND --san … adds one"
else
  ensure_leaf server server
  ensure_leaf coordinator coordinator
  ensure_leaf client1 client
  ensure_leaf client2 client
  ensure_leaf keyserver keyserver
  ensure_leaf secureproxy secureproxy
  ensure_leaf marketplace marketplace
fi
ensure_crl
ensure_fernet_key
