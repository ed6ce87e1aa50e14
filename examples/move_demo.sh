#!/bin/sh
# Moving a volume between two agents, run by ./demo inside the guest: agent A
# holds a volume full of random data; A exports it over NVMe/TCP to B alone;
# B presents it at once through dm-clone and hydrates it in the background
# with live progress; B finalizes on the kernel's completion event, the
# checksums match, and A releases its copy.
set -eu
bin=${DMCLONE_BIN:-target/debug}
mib=${DMCLONE_DEMO_MIB:-256}
volume=5e8c1f2a-3b4d-4c6e-8f0a-1b2c3d4e5f60

step() { printf '\n== %s\n' "$*"; }
# DH-HMAC-CHAP where this kernel's NVMe target can authenticate hosts (a host
# entry has dhchap_key); Debian 12's 6.1 cannot, so exports go without it.
auth=none
probe=/sys/kernel/config/nvmet/hosts/nqn.2014-08.io.dmclone:demo-probe-$$
if mkdir "$probe" 2>/dev/null; then
    [ -e "$probe/dhchap_key" ] && auth=required
    rmdir "$probe"
fi
start_agent() { # NAME PORT
    dir=/tmp/dmclone-$1
    rm -rf "$dir" "$dir.log"
    "$bin/dmclone-agent" --config /dev/null --state-dir "$dir" --dm-prefix "dmclone$1" --pool-file-size 2G \
        --nvme-export-address 127.0.0.1 --nvme-export-port "$2" --nvme-export-port-id "$2" --nvme-auth "$auth" \
        --log-level warn >>"$dir.log" 2>&1 &
    echo $! >"$dir.pid"
    tries=0
    until "$bin/dmclonectl" --socket "$dir/agent.sock" node >/dev/null 2>&1; do
        tries=$((tries + 1))
        [ $tries -lt 600 ] || { cat "$dir.log"; echo "agent $1 did not come up" >&2; exit 1; }
        sleep 0.1
    done
}
a() { "$bin/dmclonectl" --socket /tmp/dmclone-a/agent.sock "$@"; }
b() { "$bin/dmclonectl" --socket /tmp/dmclone-b/agent.sock "$@"; }
json_field() { sed -n "s/.*\"$1\": *\"\{0,1\}\([^\",]*\)\"\{0,1\}.*/\1/p" | head -n1; }

step "two agents on this host, each with its own pool: A (port 4420) and B (port 4421)"
start_agent a 4420
start_agent b 4421

step "A: a $mib MiB volume filled with random data"
a volume create $volume "${mib}M"
dev=$(a volume publish $volume)
dd if=/dev/urandom of="$dev" bs=1M count="$mib" oflag=direct status=none
want=$(dd if="$dev" bs=1M iflag=direct status=none | sha256sum | cut -c1-64)
echo "sha256 on A: $want"
a volume unpublish $volume

step "A exports it over NVMe/TCP to B's host NQN only (authentication: $auth)"
b_nqn=$(b --json node | json_field host_nqn)
export_json=$(a --json volume export $volume --host-nqn "$b_nqn" --for-transfer)
echo "$export_json" | grep -vE '"(release_token|dhchap_host_secret|dhchap_ctrl_secret)"'
nqn=$(echo "$export_json" | json_field subsystem_nqn)
# What lets B alone release A's copy later, and connect at all: passed in the
# environment, out of sight of ps.
DMCLONE_RELEASE_TOKEN=$(echo "$export_json" | json_field release_token)
DMCLONE_DHCHAP_HOST_SECRET=$(echo "$export_json" | json_field dhchap_host_secret)
DMCLONE_DHCHAP_CTRL_SECRET=$(echo "$export_json" | json_field dhchap_ctrl_secret)
export DMCLONE_RELEASE_TOKEN DMCLONE_DHCHAP_HOST_SECRET DMCLONE_DHCHAP_CTRL_SECRET

step "B presents the volume at once and hydrates it in the background"
b transfer start --volume $volume --size "${mib}M" --nqn "$nqn" --address 127.0.0.1 --port 4420 \
    --source-agent unix:/tmp/dmclone-a/agent.sock --id 00000000-0000-4000-8000-00000000d3e0
b volume show $volume
b transfer watch 00000000-0000-4000-8000-00000000d3e0

step "finalized on the kernel's event: B's device reads exactly what A held"
got=$(dd if="/dev/mapper/dmcloneb-$volume" bs=1M iflag=direct status=none | sha256sum | cut -c1-64)
echo "sha256 on B: $got"
[ "$want" = "$got" ] || { echo "the moved volume differs" >&2; exit 1; }
b --json transfer show 00000000-0000-4000-8000-00000000d3e0 | grep -E '"(state|finalize_pause_micros|done_to_finalized_micros)"'

step "A released its copy once B had all of it"
tries=0
until b --json transfer show 00000000-0000-4000-8000-00000000d3e0 | grep -q '"source_released": true'; do
    tries=$((tries + 1)); [ $tries -lt 300 ] || { echo "A never released its copy" >&2; exit 1; }; sleep 0.1
done
echo "A's volumes:"; a volume list
echo "B's volumes:"; b volume list

step "cleaning up"
b volume unpublish $volume
b volume delete $volume
for name in a b; do kill -TERM "$(cat /tmp/dmclone-$name.pid)"; done
wait
echo "move demo done"
