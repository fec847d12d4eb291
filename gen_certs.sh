#!/bin/sh
# gen_certs.sh - create the TLS material for the reqapi aggregated API server.
#
# Makes a private CA and a serving certificate whose SANs contain
# <service>.<namespace>.svc, the exact name kube-apiserver's aggregator verifies
# (ServerName = <svc>.<ns>.svc, trust = APIService spec.caBundle). Optionally
# also a client certificate for trying the server's --client-ca-file locally.
#
# Needs only a POSIX shell and openssl (OpenSSL 1.1.1+, 3.x or LibreSSL).
# Every extension comes from a config file (-config / -extfile), not -addext,
# because `openssl x509 -req` does not copy CSR extensions and older/LibreSSL
# builds lack -addext.
#
# SPDX-License-Identifier: Apache-2.0
set -eu

PROG=${0##*/}
SERVICE=requests-apiserver-service
NAMESPACE=default
DOMAIN=cluster.local
OUT=certs
LOCAL=0
CLIENT=
FORCE=0
REUSE_CA=0
KEY_TYPE=ecdsa
CA_DAYS=3650
LEAF_DAYS=365
APISERVICE=v1beta1.k8s.wujiuye.com
SECRET=requests-apiserver-tls

usage() {
    cat <<EOF
Usage: ./$PROG [options]

Create a CA, a serving certificate for the reqapi aggregated API server and
(optionally) a client certificate, verify them, and print the caBundle and the
kubectl commands that install them.

Options:
  --service NAME     Name of the Service in front of reqapi; the APIService's
                     spec.service.name. Default: $SERVICE
  --namespace NS     Namespace of that Service. kube-apiserver verifies the
                     serving cert against NAME.NS.svc. Default: $NAMESPACE
  --domain DOMAIN    Cluster DNS domain, used for the NAME.NS.svc.DOMAIN SAN.
                     Default: $DOMAIN
  --out DIR          Output directory (created if missing). Default: $OUT/
  --local            Also put DNS:localhost and IP:127.0.0.1 into the serving
                     cert, for running reqapi on your machine.
  --client NAME      Also issue a client certificate (EKU clientAuth, CN=NAME,
                     signed by the same CA): client.pem / client-key.pem, for
                     trying reqapi's --client-ca-file locally with curl.
  --key-type TYPE    ecdsa (P-256, default: cheaper TLS handshakes) or rsa
                     (2048 bit) for the CA and all certificates.
  --force            Replace an existing CA in DIR. Everything signed by the old
                     CA stops being trusted: re-create the Secret AND patch the
                     APIService caBundle afterwards.
  --reuse-ca         Keep the existing ca.pem/ca-key.pem in DIR and only issue a
                     new serving (and client) certificate, e.g. to renew before
                     expiry; the caBundle stays the same.
  -h, --help         Show this help and exit.

Files written to DIR (keys are mode 0600):
  ca.pem ca-key.pem                  CA, 3650 days; ca.pem goes into caBundle
  apiservice.pem apiservice-key.pem  serving cert + key, 365 days; go into the
                                     Secret $SECRET (tls.crt/tls.key)
  client.pem client-key.pem          only with --client

Re-running when DIR/ca.pem exists fails unless --force or --reuse-ca is given:
a CA that is in use must not be replaced by accident.
EOF
}

die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

need_arg() {
    # $1 = option name, $2 = number of remaining args (incl. the option)
    [ "$2" -ge 2 ] || die "option $1 needs a value (see --help)"
}

while [ $# -gt 0 ]; do
    case $1 in
        --service) need_arg "$1" $#; SERVICE=$2; shift 2 ;;
        --service=*) SERVICE=${1#*=}; shift ;;
        --namespace|-n) need_arg "$1" $#; NAMESPACE=$2; shift 2 ;;
        --namespace=*) NAMESPACE=${1#*=}; shift ;;
        --domain) need_arg "$1" $#; DOMAIN=$2; shift 2 ;;
        --domain=*) DOMAIN=${1#*=}; shift ;;
        --out) need_arg "$1" $#; OUT=$2; shift 2 ;;
        --out=*) OUT=${1#*=}; shift ;;
        --client) need_arg "$1" $#; CLIENT=$2; shift 2 ;;
        --client=*) CLIENT=${1#*=}; shift ;;
        --key-type) need_arg "$1" $#; KEY_TYPE=$2; shift 2 ;;
        --key-type=*) KEY_TYPE=${1#*=}; shift ;;
        --local) LOCAL=1; shift ;;
        --force) FORCE=1; shift ;;
        --reuse-ca) REUSE_CA=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) printf '%s: error: unknown argument: %s\n\n' "$PROG" "$1" >&2; usage >&2; exit 2 ;;
    esac
done

# ---------------------------------------------------------------- validation
is_dns_label() {
    # RFC 1123 label as Kubernetes uses it for Service and Namespace names.
    case $1 in
        ''|-*|*-|*[!a-z0-9-]*) return 1 ;;
    esac
    [ "${#1}" -le 63 ]
}

is_dns_subdomain() {
    case $1 in
        ''|.*|*.|*..*|*[!a-z0-9.-]*) return 1 ;;
    esac
    [ "${#1}" -le 253 ]
}

is_dns_label "$SERVICE" || die "--service '$SERVICE' is not a valid Service name (lowercase a-z, 0-9, '-', max 63)"
case $SERVICE in
    [!a-z]*) die "--service '$SERVICE' must start with a letter (Service names are DNS-1035 labels)" ;;
esac
is_dns_label "$NAMESPACE" || die "--namespace '$NAMESPACE' is not a valid namespace name (lowercase a-z, 0-9, '-', max 63)"
is_dns_subdomain "$DOMAIN" || die "--domain '$DOMAIN' is not a valid DNS domain"
[ -n "$OUT" ] || die "--out must not be empty"
if [ -n "$CLIENT" ]; then
    case $CLIENT in
        *[!A-Za-z0-9:._@-]*) die "--client '$CLIENT' may only contain A-Z a-z 0-9 : . _ @ -" ;;
    esac
    [ "${#CLIENT}" -le 64 ] || die "--client name is longer than 64 characters"
fi
case $KEY_TYPE in
    ecdsa|ec) KEY_TYPE=ecdsa ;;
    rsa) ;;
    *) die "--key-type must be ecdsa or rsa, not '$KEY_TYPE'" ;;
esac
[ "$FORCE" -eq 0 ] || [ "$REUSE_CA" -eq 0 ] || die "--force and --reuse-ca exclude each other"
command -v openssl >/dev/null 2>&1 || die "openssl not found in PATH"

FQDN=$SERVICE.$NAMESPACE.svc
# The CN is ignored by kube-apiserver (SANs only) but is limited to 64 bytes.
LEAF_CN=$FQDN
[ "${#LEAF_CN}" -le 64 ] || LEAF_CN=$SERVICE

if [ -e "$OUT/ca.pem" ]; then
    if [ "$REUSE_CA" -eq 1 ]; then
        [ -f "$OUT/ca-key.pem" ] || die "--reuse-ca: $OUT/ca-key.pem is missing"
    elif [ "$FORCE" -eq 0 ]; then
        die "$OUT/ca.pem already exists - refusing to replace a CA that may be in use.
  A new CA invalidates the caBundle in APIService $APISERVICE and every cert it signed.
  To renew only the serving cert with the same CA:  ./$PROG --out $OUT --reuse-ca ...
  To really replace the CA (then re-create the Secret AND patch the caBundle):  ./$PROG --out $OUT --force ..."
    fi
elif [ "$REUSE_CA" -eq 1 ]; then
    die "--reuse-ca: $OUT/ca.pem does not exist"
fi

mkdir -p "$OUT"
# Work in a private scratch dir inside OUT and move files into place only after
# every check passed, so a failed run never leaves half-replaced material.
umask 077
WORK=$(mktemp -d "$OUT/.gen_certs.XXXXXX") || die "cannot create a temporary directory in $OUT"
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- helpers
q() {
    # run a command quietly; on failure show its stderr and stop
    "$@" 2>"$WORK/stderr" || {
        cat "$WORK/stderr" >&2
        die "command failed: $*"
    }
}

shq() {
    # quote a word for copy-pasting into a shell, only when needed
    case $1 in
        *[!A-Za-z0-9_./:=@%+-]*) printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")" ;;
        *) printf '%s' "$1" ;;
    esac
}

new_key() {
    # $1 = output file; ECDSA P-256 (SEC1 PEM) or RSA 2048.
    if [ "$KEY_TYPE" = ecdsa ]; then
        q openssl ecparam -name prime256v1 -genkey -noout -out "$1"
    else
        q openssl genrsa -out "$1" 2048
    fi
    chmod 600 "$1"
}

serial() {
    # random positive 127-bit serial (CAs must not reuse serials)
    printf '0x%s' "$(openssl rand -hex 16 | sed 's/^./7/')"
}

sign_leaf() {
    # $1 = config file, $2 = output stem in $WORK ($2.pem, $2-key.pem), $3 = extensions section:
    # a new key, a CSR, and a certificate signed by the CA with the extensions from the config
    new_key "$WORK/$2-key.pem"
    q openssl req -new -sha256 -config "$1" -key "$WORK/$2-key.pem" -out "$WORK/$2.csr"
    q openssl x509 -req -sha256 -days "$LEAF_DAYS" -set_serial "$(serial)" \
        -in "$WORK/$2.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca-key.pem" \
        -extfile "$1" -extensions "$3" -out "$WORK/$2.pem"
}

if [ "$KEY_TYPE" = ecdsa ]; then
    LEAF_KU=digitalSignature
else
    LEAF_KU=digitalSignature,keyEncipherment
fi
STAMP=$(date -u +%Y%m%dT%H%M%SZ)

# ---------------------------------------------------------------- CA
if [ "$REUSE_CA" -eq 1 ]; then
    cp "$OUT/ca.pem" "$WORK/ca.pem"
    cp "$OUT/ca-key.pem" "$WORK/ca-key.pem"
    chmod 600 "$WORK/ca-key.pem"
    openssl x509 -in "$WORK/ca.pem" -noout -checkend 0 >/dev/null ||
        die "$OUT/ca.pem has expired; create a new CA with --force"
else
    cat >"$WORK/ca.cnf" <<EOF
[ req ]
distinguished_name = dn
prompt             = no
[ dn ]
CN = reqapi-ca $STAMP
[ v3_ca ]
basicConstraints       = critical,CA:TRUE
keyUsage               = critical,keyCertSign,cRLSign
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always
EOF
    new_key "$WORK/ca-key.pem"
    q openssl req -x509 -new -sha256 -days "$CA_DAYS" -set_serial "$(serial)" \
        -config "$WORK/ca.cnf" -extensions v3_ca \
        -key "$WORK/ca-key.pem" -out "$WORK/ca.pem"
fi

# ---------------------------------------------------------------- serving cert
{
    cat <<EOF
[ req ]
distinguished_name = dn
prompt             = no
[ dn ]
CN = $LEAF_CN
[ v3_leaf ]
basicConstraints       = critical,CA:FALSE
keyUsage               = critical,$LEAF_KU
extendedKeyUsage       = serverAuth
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid,issuer
subjectAltName         = @alt_names
[ alt_names ]
DNS.1 = $SERVICE
DNS.2 = $SERVICE.$NAMESPACE
DNS.3 = $FQDN
DNS.4 = $FQDN.$DOMAIN
EOF
    if [ "$LOCAL" -eq 1 ]; then
        printf 'DNS.5 = localhost\nIP.1 = 127.0.0.1\n'
    fi
} >"$WORK/server.cnf"

sign_leaf "$WORK/server.cnf" apiservice v3_leaf

# ---------------------------------------------------------------- client cert
if [ -n "$CLIENT" ]; then
    cat >"$WORK/client.cnf" <<EOF
[ req ]
distinguished_name = dn
prompt             = no
[ dn ]
CN = $CLIENT
[ v3_client ]
basicConstraints       = critical,CA:FALSE
keyUsage               = critical,$LEAF_KU
extendedKeyUsage       = clientAuth
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid,issuer
EOF
    sign_leaf "$WORK/client.cnf" client v3_client
fi

# ---------------------------------------------------------------- self-checks
check_pair() {
    # $1 = cert, $2 = key: the public keys must be identical
    c=$(openssl x509 -in "$1" -noout -pubkey)
    k=$(openssl pkey -in "$2" -pubout)
    [ "$c" = "$k" ] || die "self-check failed: $2 does not belong to $1"
}

# Chain + purpose + hostname, with X.509 strict checks (what Python >= 3.13's
# default contexts enforce, e.g. keyUsage on the CA and AKI on the leaf).
openssl verify -x509_strict -CAfile "$WORK/ca.pem" -purpose sslserver \
    -verify_hostname "$FQDN" "$WORK/apiservice.pem" >/dev/null ||
    die "self-check failed: apiservice.pem does not verify for $FQDN against ca.pem"
if [ "$LOCAL" -eq 1 ]; then
    openssl verify -CAfile "$WORK/ca.pem" -purpose sslserver \
        -verify_hostname localhost -verify_ip 127.0.0.1 "$WORK/apiservice.pem" >/dev/null ||
        die "self-check failed: apiservice.pem does not verify for localhost/127.0.0.1"
fi
# OpenSSL (and Python) fall back to the CN when a cert has no SAN, Go (i.e.
# kube-apiserver) does not - so insist on the SAN explicitly.
SANS=$(openssl x509 -in "$WORK/apiservice.pem" -noout -text |
    sed -n '/X509v3 Subject Alternative Name/{n;p;}' | tr -d ' ')
[ -n "$SANS" ] || die "self-check failed: serving cert has no subjectAltName"
printf '%s\n' "$SANS" | tr ',' '\n' | grep -qx "DNS:$FQDN" ||
    die "self-check failed: SAN DNS:$FQDN missing (got: $SANS)"
check_pair "$WORK/apiservice.pem" "$WORK/apiservice-key.pem"
if [ -n "$CLIENT" ]; then
    openssl verify -x509_strict -CAfile "$WORK/ca.pem" -purpose sslclient "$WORK/client.pem" >/dev/null ||
        die "self-check failed: client.pem does not verify against ca.pem"
    check_pair "$WORK/client.pem" "$WORK/client-key.pem"
fi

# ---------------------------------------------------------------- install
FILES="ca.pem ca-key.pem apiservice.pem apiservice-key.pem"
[ -z "$CLIENT" ] || FILES="$FILES client.pem client-key.pem"
STALE_CLIENT=0
if [ -z "$CLIENT" ] && [ "$REUSE_CA" -eq 0 ] && [ -e "$OUT/client.pem" ]; then
    # signed by the CA that is being replaced: would no longer verify
    rm -f "$OUT/client.pem" "$OUT/client-key.pem"
    STALE_CLIENT=1
fi
for f in $FILES; do
    case $f in
        *-key.pem) chmod 600 "$WORK/$f" ;;
        *) chmod 644 "$WORK/$f" ;;
    esac
    mv -f "$WORK/$f" "$OUT/$f"
done

CA_BUNDLE=$(openssl base64 -in "$OUT/ca.pem" | tr -d '\r\n')
ENDDATE=$(openssl x509 -in "$OUT/apiservice.pem" -noout -enddate | sed 's/^notAfter=//')
CA_ENDDATE=$(openssl x509 -in "$OUT/ca.pem" -noout -enddate | sed 's/^notAfter=//')
CERT_ARG=$(shq "--cert=$OUT/apiservice.pem")
KEY_ARG=$(shq "--key=$OUT/apiservice-key.pem")

cat <<EOF
OK: serving certificate for $FQDN verified against the CA (chain, serverAuth, hostname, SAN, key).
  $OUT/apiservice.pem     notAfter=$ENDDATE
  $OUT/apiservice-key.pem (0600)
  $OUT/ca.pem             notAfter=$CA_ENDDATE
  $OUT/ca-key.pem         (0600, keep it private; needed to renew with --reuse-ca)
  SANs: $SANS
EOF
if [ -n "$CLIENT" ]; then
    printf '  %s/client.pem         CN=%s, clientAuth (key: %s/client-key.pem)\n' "$OUT" "$CLIENT" "$OUT"
fi
if [ "$STALE_CLIENT" -eq 1 ]; then
    printf '  removed %s/client.pem and client-key.pem (signed by the replaced CA; use --client to issue a new one)\n' "$OUT"
fi
cat <<EOF

caBundle (base64 of $OUT/ca.pem, one line, for spec.caBundle of APIService $APISERVICE):
$CA_BUNDLE

1. Create the Secret with the serving cert in namespace $NAMESPACE:
kubectl -n $NAMESPACE create secret tls $SECRET $CERT_ARG $KEY_ARG
   To replace an existing Secret instead:
kubectl -n $NAMESPACE create secret tls $SECRET $CERT_ARG $KEY_ARG --dry-run=client -o yaml | kubectl apply -f -

2. Put the caBundle into k8s/base/apiservice.yaml before 'kubectl apply -k k8s/'
   (replace the value of 'caBundle:' with the line above), or, once the
   APIService exists, patch it:
kubectl patch apiservice $APISERVICE --type=merge -p '{"spec":{"caBundle":"$CA_BUNDLE"}}'
EOF
