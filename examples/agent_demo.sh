#!/bin/sh
# The agent's main job on the embedded default, run by ./demo inside the guest
# (or on an opted-in host): start dmclone-agent with nothing but a state
# directory, create volumes, write and read them through their public devices,
# list them with their state and the pool's usage, extend one while it is in
# use, survive a restart, report what changed since a snapshot, and clean up.
set -eu
bin=${DMCLONE_BIN:-target/debug}
state=${DMCLONE_DEMO_STATE:-/tmp/dmclone-demo}
mib=${DMCLONE_DEMO_MIB:-256}
ctl="$bin/dmclonectl --socket $state/agent.sock"
db=0b9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d11
logs=7c1e2a4b-9d3f-4e5a-8b6c-1d2e3f4a5b6c

step() { printf '\n== %s\n' "$*"; }
start_agent() {
    "$bin/dmclone-agent" --config /dev/null --state-dir "$state" --pool-file-size 2G --log-level warn \
        >>"$state.log" 2>&1 &
    agent=$!
    tries=0
    until $ctl node >/dev/null 2>&1; do
        tries=$((tries + 1))
        [ $tries -lt 600 ] || { cat "$state.log"; echo "the agent did not come up" >&2; exit 1; }
        kill -0 $agent 2>/dev/null || { cat "$state.log"; echo "the agent exited" >&2; exit 1; }
        sleep 0.1
    done
}
stop_agent() { kill -TERM $agent; wait $agent; }

rm -rf "$state" "$state.log" "$state.changes"
mkdir -p "$state"
step "starting: dmclone-agent --state-dir $state (embedded default: sparse pool file on a loop device)"
start_agent
$ctl node

step "creating two volumes"
$ctl volume create $db "${mib}M"
$ctl volume create $logs 64M

step "publishing them: stable /dev/mapper paths, with or without udev"
db_dev=$($ctl volume publish $db)
logs_dev=$($ctl volume publish $logs)
echo "$db_dev"
echo "$logs_dev"

step "writing $mib MiB of random data to the db volume and reading it back"
dd if=/dev/urandom of="$state.data" bs=1M count="$mib" status=none
dd if="$state.data" of="$db_dev" bs=1M oflag=direct status=none
want=$(sha256sum <"$state.data" | cut -c1-64)
got=$(dd if="$db_dev" bs=1M iflag=direct status=none | sha256sum | cut -c1-64)
echo "written sha256 $want"
echo "read    sha256 $got"
[ "$want" = "$got" ] || { echo "read-back differs" >&2; exit 1; }

step "extending the logs volume to 128 MiB while it is published"
$ctl volume extend $logs 128M
echo "block device size now $(blockdev --getsize64 "$logs_dev") bytes"

step "volumes and pool usage"
$ctl volume list
$ctl node | grep -E '^(pool|volumes)'

step "restarting the agent: state is durable, devices are adopted"
stop_agent
start_agent
$ctl volume list
got=$(dd if="$db_dev" bs=1M iflag=direct status=none | sha256sum | cut -c1-64)
[ "$want" = "$got" ] || { echo "data changed across the restart" >&2; exit 1; }
echo "db volume still reads sha256 $got"

step "changed-block tracking: a snapshot, three small writes, what changed since the snapshot"
snap=5a9d1c3e-5f1a-4f7e-9a57-3f0c2b8f6d99
$ctl snapshot create $snap --volume $db
for offset_kib in 0 64 40960; do
    dd if=/dev/urandom of="$db_dev" bs=4K count=1 seek=$((offset_kib / 4)) oflag=direct status=none
done
$ctl volume changes $db --since-snapshot $snap | tee "$state.changes"
grep -q '^2 extents, 192.0KiB' "$state.changes" || { echo "expected blocks 0-1 and 640 of 64 KiB" >&2; exit 1; }
$ctl snapshot delete $snap

step "unpublishing and deleting the logs volume; a published volume refuses deletion"
if $ctl volume delete $db; then echo "deleting a published volume must fail" >&2; exit 1; fi
$ctl volume unpublish $logs
$ctl volume delete $logs
$ctl volume list
$ctl --json node | grep -E '"(data_used_bytes|volume_count)"'

step "cleaning up"
$ctl volume unpublish $db
$ctl volume delete $db
stop_agent
echo "agent demo done"
