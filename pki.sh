#!/usr/bin/env bash
# Builds securemesh's PKI: one CA, one certificate per identity, and the shared Fernet key.
#
#   ./pki.sh                         create whatever is missing (existing material is kept)
#   ./pki.sh --force                 regenerate everything
#   ./pki.sh --rsa                   RSA-2048 keys instead of ECDSA P-256
#   ./pki.sh issue NAME KIND         add one identity; KIND is one of
#            --client --server --coordinator --keyserver --secureproxy --marketplace (--both: kind "service")
#            [--not-before YYYYMMDDHHMMSSZ] [--not-after YYYYMMDDHHMMSSZ] [--force]
#   ./pki.sh revoke NAME             revoke NAME's certificate and rewrite crl.pem (running roles reload it)
#
# Each leaf names its identity twice: CN=NAME, and a URI SAN spiffe://securemesh/KIND/NAME that the
# policy (roles/policy.json) refers to. Output goes to $PKI_DIR, or certs/ beside this script.
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }

command -v openssl >/dev/null 2>&1 || { echo "pki.sh: openssl not found; install it (apt-get install openssl)" >&2; exit 1; }

here=$(cd "$(dirname "$0")" && pwd)
dir=${PKI_DIR:-$here/certs}
force=0
key_type=ec
action=all
issue_name=""
issue_kind=""
not_before=""
not_after=""

while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=1 ;;
    --rsa) key_type=rsa ;;
    --client|--server|--both|--coordinator|--keyserver|--secureproxy|--marketplace) issue_kind=${1#--} ;;
    issue) action=issue; shift; issue_name=${1:-} ;;
    revoke) action=revoke; shift; issue_name=${1:-} ;;
    --not-before) shift; not_before=${1:-} ;;
    --not-after) shift; not_after=${1:-} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "pki.sh: unknown argument '$1' (see ./pki.sh --help)" >&2; exit 2 ;;
  esac
  shift
done

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
default_crl_days = 3650
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
# with their name. The coordinator and the SecureProxy both serve and call onward, so they get both EKUs.
make_leaf() { # name kind
  local name=$1 kind=$2 eku sans usage ext spiffe_kind=$2
  case "$kind" in
    server|keyserver|marketplace) eku=serverAuth ;;
    client) eku=clientAuth ;;
    coordinator|secureproxy) eku=serverAuth,clientAuth ;;
    both) eku=serverAuth,clientAuth; spiffe_kind=service ;;
    *) echo "pki.sh: identity kind must be --client, --server, --coordinator, --keyserver, --secureproxy, --marketplace or --both" >&2; exit 2 ;;
  esac
  if [ "$kind" = client ]; then sans="DNS:$name"; else sans="DNS:localhost,IP:127.0.0.1,IP:::1"; fi
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

write_crl() {
  ensure_ca_db
  openssl ca -batch -config "$dir/ca_db/ca.cnf" -gencrl -out "$dir/crl.pem" 2>/dev/null
  chmod 644 "$dir/crl.pem"
}

ensure_leaf() { # name kind
  if [ "$force" = 1 ] || [ ! -s "$dir/$1_cert.pem" ] || [ ! -s "$dir/$1_key.pem" ]; then
    make_leaf "$1" "$2"
    echo "pki.sh: issued $1 ($2)"
  fi
}

if [ "$force" = 1 ] || [ ! -s "$dir/ca_cert.pem" ] || [ ! -s "$dir/ca_key.pem" ]; then
  make_ca
  force=1 # a new CA invalidates every leaf
  echo "pki.sh: created CA in $dir"
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
[ -s "$dir/crl.pem" ] || write_crl

if [ "$force" = 1 ] || [ ! -s "$dir/encryption_key.txt" ]; then
  # Fernet key: url-safe base64 of 32 random bytes (16 signing, 16 encryption).
  openssl rand 32 | openssl base64 -A | tr '+/' '-_' >"$dir/encryption_key.txt"
  echo >>"$dir/encryption_key.txt"
  chmod 600 "$dir/encryption_key.txt"
  echo "pki.sh: wrote encryption_key.txt"
fi
