#!/usr/bin/env bash
# Builds securemesh's PKI: one CA, one certificate per identity, and the shared Fernet key.
#
#   ./pki.sh                         create whatever is missing (existing material is kept)
#   ./pki.sh --force                 regenerate everything
#   ./pki.sh --rsa                   RSA-2048 keys instead of ECDSA P-256
#   ./pki.sh issue NAME KIND         add one identity; KIND is one of
#            --client --server --coordinator --keyserver --secureproxy --marketplace (--both: kind "service")
#            [--san DNS:host,IP:addr ...] [--not-before YYYYMMDDHHMMSSZ] [--not-after YYYYMMDDHHMMSSZ] [--force]
#   ./pki.sh revoke NAME             revoke NAME's certificate and rewrite crl.pem (running roles reload it)
#   ./pki.sh crl                     re-sign crl.pem with the next CRL number and a fresh nextUpdate: run it on
#                                    the CA host well before nextUpdate (cron, daily), then copy crl.pem to every host
#
# crl.pem lives CRL_DAYS days (default 30). Roles refuse to start without a valid one (unless --no-crl), and keep
# the one in force when a reload finds it missing, older, expired or unsigned. A plain run writes it when missing
# and re-signs it when it is past half its life, has no number or nextUpdate, outlives CRL_DAYS, or is not this
# CA's; a new CA gets an empty, numbered CRL at once.
#
# Each leaf names its identity twice: CN=NAME, and a URI SAN spiffe://securemesh/KIND/NAME that the
# policy (roles/policy.json) refers to. --san (repeatable, or a comma list) gives it the host names and
# addresses it serves on, checked by every peer that connects to it; without it a serving identity gets
# DNS:localhost,IP:127.0.0.1,IP:::1 and a client DNS:NAME. Output goes to $PKI_DIR, or certs/ beside this script.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

command -v openssl >/dev/null 2>&1 || { echo "pki.sh: openssl not found; install it (apt-get install openssl)" >&2; exit 1; }

here=$(cd "$(dirname "$0")" && pwd)
dir=${PKI_DIR:-$here/certs}
crl_days=${CRL_DAYS:-30}
[[ "$crl_days" =~ ^[1-9][0-9]{0,4}$ ]] || { echo "pki.sh: CRL_DAYS must be a whole number of days from 1 to 99999, not '$crl_days'" >&2; exit 2; }
force=0
key_type=ec
action=all
issue_name=""
issue_kind=""
not_before=""
not_after=""
san_args=()

while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=1 ;;
    --rsa) key_type=rsa ;;
    --client|--server|--both|--coordinator|--keyserver|--secureproxy|--marketplace) issue_kind=${1#--} ;;
    issue) action=issue; shift; issue_name=${1:-} ;;
    revoke) action=revoke; shift; issue_name=${1:-} ;;
    crl) action=crl ;;
    --not-before) shift; not_before=${1:-} ;;
    --not-after) shift; not_after=${1:-} ;;
    --san) shift; san_args+=("${1:-}") ;;
    -h|--help) usage; exit 0 ;;
    *) echo "pki.sh: unknown argument '$1' (see ./pki.sh --help)" >&2; exit 2 ;;
  esac
  shift
done

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

umask 077
mkdir -p "$dir"

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
  if [ "$force" = 1 ] || [ ! -s "$dir/$1_cert.pem" ] || [ ! -s "$dir/$1_key.pem" ]; then
    make_leaf "$1" "$2"
    echo "pki.sh: issued $1 ($2${host_sans:+, $host_sans})"
  elif [ -n "$host_sans" ] && ! has_host_sans "$dir/$1_cert.pem"; then
    echo "pki.sh: $1 exists with other host names or addresses; add --force to reissue it for $host_sans" >&2
    exit 2
  fi
}

# A host with a copy of the PKI but not the CA key must never make a CA of its own (it would replace ca_cert.pem).
if [ "$action" = crl ] && { [ ! -s "$dir/ca_cert.pem" ] || [ ! -s "$dir/ca_key.pem" ]; }; then
  echo "pki.sh: crl needs the CA's certificate and key ($dir/ca_cert.pem, ca_key.pem): run it on the CA host" >&2
  exit 2
fi

# `issue NAME --force` reissues that one leaf: a new CA would leave every other certificate untrusted.
if { [ "$force" = 1 ] && [ "$action" = all ]; } || [ ! -s "$dir/ca_cert.pem" ] || [ ! -s "$dir/ca_key.pem" ]; then
  make_ca
  force=1 # a new CA invalidates every leaf
  echo "pki.sh: created CA in $dir, with an empty crl.pem ($(describe_crl))"
fi

if [ "$action" = revoke ]; then
  [ -s "$dir/${issue_name}_cert.pem" ] || { echo "pki.sh: no certificate $dir/${issue_name}_cert.pem to revoke" >&2; exit 2; }
  ensure_ca_db
  openssl ca -batch -config "$dir/ca_db/ca.cnf" -revoke "$dir/${issue_name}_cert.pem" >/dev/null 2>&1 || true
  serial=$(openssl x509 -in "$dir/${issue_name}_cert.pem" -noout -serial | cut -d= -f2)
  grep -qi "^R.*	${serial}	" "$dir/ca_db/index.txt" || { echo "pki.sh: revoking $issue_name failed" >&2; exit 1; }
  write_crl
  echo "pki.sh: revoked $issue_name; wrote crl.pem (running roles reload it within seconds)"
  exit 0
fi

if [ "$action" = crl ]; then
  write_crl
  echo "pki.sh: wrote crl.pem, $(describe_crl); copy it to every host (running roles reload it within seconds)"
  exit 0
fi

if [ "$action" = issue ]; then
  [ -n "$issue_name" ] || { echo "pki.sh: issue needs a NAME" >&2; exit 2; }
  [[ "$issue_name" =~ ^[A-Za-z0-9_-]+$ ]] || { echo "pki.sh: NAME may hold letters, digits, - and _ only" >&2; exit 2; }
  [ -n "$issue_kind" ] || { echo "pki.sh: issue $issue_name needs a kind: --client, --server, --coordinator, --keyserver, --secureproxy, --marketplace or --both" >&2; exit 2; }
  ensure_leaf "$issue_name" "$issue_kind"
  exit 0
fi

ensure_leaf server server
ensure_leaf coordinator coordinator
ensure_leaf client1 client
ensure_leaf client2 client
ensure_leaf keyserver keyserver
ensure_leaf secureproxy secureproxy
ensure_leaf marketplace marketplace
if [ ! -s "$dir/crl.pem" ]; then
  write_crl
  echo "pki.sh: wrote crl.pem, $(describe_crl)"
else
  reason=$(crl_refresh_reason)
  if [ -n "$reason" ]; then
    write_crl
    echo "pki.sh: re-signed crl.pem ($reason), $(describe_crl)"
  fi
fi

if [ "$force" = 1 ] || [ ! -s "$dir/encryption_key.txt" ]; then
  # Fernet key: url-safe base64 of 32 random bytes (16 signing, 16 encryption).
  openssl rand 32 | openssl base64 -A | tr '+/' '-_' >"$dir/encryption_key.txt"
  echo >>"$dir/encryption_key.txt"
  chmod 600 "$dir/encryption_key.txt"
  echo "pki.sh: wrote encryption_key.txt"
fi
