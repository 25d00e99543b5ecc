#!/bin/sh
# ┌──────────────────────────────────────────────────────────────────────────┐
# │ nginx-certificate: check a certificate + key pair, install the copy nginx │
# │ reads                                                                    │
# └──────────────────────────────────────────────────────────────────────────┘
#   nginx-certificate CERT KEY DIR
# nginx never reads TLS_CERT/TLS_KEY directly but a copy in DIR (tmpfs), made only
# from a pair that parses, matches (same public key) and has not expired. A renewal
# written into the volume half-way, or a wrong key, therefore never reaches nginx, not
# even through a later reload for another reason: the last good pair keeps serving.
# Used by the entrypoint at start and by the supervisor when the files change.
# Prints the installed certificate's serial and expiry; on a bad pair prints why on
# stderr and exits 1, leaving DIR as it was.
# https://docs.openssl.org/3.0/man1/openssl-x509/  https://docs.openssl.org/3.0/man1/openssl-pkey/
set -eu

cert=$1 key=$2 dir=$3

fail() { printf '%s\n' "$*" >&2; exit 1; }

[ -r "$cert" ] || fail "$cert is missing or not readable by uid $(id -u)"
[ -r "$key" ] || fail "$key is missing or not readable by uid $(id -u)"
cert_pub=$(openssl x509 -in "$cert" -noout -pubkey 2>/dev/null) \
    || fail "$cert is not a PEM certificate"
key_pub=$(openssl pkey -in "$key" -pubout 2>/dev/null) \
    || fail "$key is not an unencrypted PEM private key"
[ "$cert_pub" = "$key_pub" ] || fail "$key is not the key of the certificate in $cert"
openssl x509 -in "$cert" -noout -checkend 0 >/dev/null 2>&1 \
    || fail "the certificate in $cert has expired ($(openssl x509 -in "$cert" -noout -enddate))"

# Copies appear whole (rename), the key is never readable by anyone else.
umask 077
mkdir -p "$dir"
cp "$cert" "$dir/fullchain.pem.new"
cp "$key" "$dir/privkey.pem.new"
mv -f "$dir/privkey.pem.new" "$dir/privkey.pem"
mv -f "$dir/fullchain.pem.new" "$dir/fullchain.pem"
openssl x509 -in "$dir/fullchain.pem" -noout -serial -enddate | tr '\n' ' ' | sed 's/ $//'
