#!/usr/bin/env bash
# Check the Promela model of docs/model/election.pml with Spin (see docs/model/README.md).
#
#   tools/check_model.sh           exhaustive runs of both parts + every variant that must fail
#   tools/check_model.sh --quick   a depth-bounded run of the lease part, the commit part in
#                                  full, and one failing variant of each (a few seconds)
#
# Exit 0 when the real model passes and every mutant fails; 1 otherwise; 2 when spin or gcc
# is missing and cannot be installed (apt-get, as root only).
set -u

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL="$HERE/docs/model/election.pml"
QUICK=0
OPT=-O2
[ "${1:-}" = "--quick" ] && QUICK=1 && OPT=-O0      # quick runs are short: compile fast

need() {   # tool package
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing $2 (for $1)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null 2>&1; }
  fi
  command -v "$1" >/dev/null 2>&1 && return 0
  echo "check_model: $1 is not installed (apt-get install $2) and cannot be installed here" >&2
  exit 2
}
need spin spin
need gcc gcc

WORK="$(mktemp -d /tmp/ecl-model.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
cp "$MODEL" "$WORK/election.pml"
cd "$WORK" || exit 1

FAILED=0

# run NAME EXPECT(pass|fail) PAN_ARGS -- SPIN_DEFINES...
run() {
  local name=$1 expect=$2 panargs=$3; shift 3
  local dir="$WORK/$name"
  mkdir -p "$dir" && cp "$WORK/election.pml" "$dir/" && cd "$dir" || return 1
  if ! spin -a "$@" election.pml >spin.out 2>&1; then
    echo "FAIL  $name: spin -a $* failed"; cat spin.out; FAILED=1; cd "$WORK"; return
  fi
  if ! gcc "$OPT" -w -DSAFETY -DCOLLAPSE -o pan pan.c >gcc.out 2>&1; then
    echo "FAIL  $name: gcc failed"; tail -5 gcc.out; FAILED=1; cd "$WORK"; return
  fi
  local t0=$SECONDS
  # shellcheck disable=SC2086
  ./pan $panargs >pan.out 2>&1
  local errors states depth
  errors=$(sed -n 's/.*errors: \([0-9]*\).*/\1/p' pan.out | tail -1)
  states=$(sed -n 's/^ *\([0-9.e+]*\) states, stored.*/\1/p' pan.out | tail -1)
  depth=$(sed -n 's/.*depth reached \([0-9]*\).*/\1/p' pan.out | tail -1)
  local what="spin -a $* ; pan $panargs: ${states:-?} states, depth ${depth:-?}, errors: ${errors:-?}, $((SECONDS - t0)) s"
  if [ "$expect" = pass ]; then
    if [ "${errors:-x}" = 0 ] && { [ $QUICK = 1 ] || ! grep -q "max search depth too small" pan.out; }; then
      echo "PASS  $name  ($what)"
    else
      echo "FAIL  $name must pass  ($what)"; grep -E "violated|too small" pan.out | head -3; FAILED=1
    fi
  else
    if [ -n "$errors" ] && [ "$errors" != 0 ] && grep -q "assertion violated" pan.out; then
      echo "PASS  $name fails as it must  ($what; $(grep -m1 -o 'assertion violated.*' pan.out))"
    else
      echo "FAIL  $name must find a violation and did not  ($what)"; FAILED=1
    fi
  fi
  cd "$WORK" || exit 1
}

if [ $QUICK = 1 ]; then
  run leases-bounded pass "-m100 -w24"
  run commits pass "-E -m100000 -w22" -DCOMMITS
  run mutant-nohandover fail "-m100 -w24" -DMUTANT_NOHANDOVER
  run commits-no-rule-no-view-change fail "-E -m100000 -w22" -DCOMMITS -DNO_VIEW_CHANGE -DVOTE_RULE=0
else
  run leases pass "-m20000000 -w26"
  run commits pass "-E -m100000 -w22" -DCOMMITS
  run commits-raft-rule-alone pass "-E -m100000 -w22" -DCOMMITS -DNO_VIEW_CHANGE -DVOTE_RULE=2
  run mutant-renew fail "-m20000000 -w26" -DMUTANT_RENEW
  run mutant-nohandover fail "-m20000000 -w26" -DMUTANT_NOHANDOVER
  run mutant-short fail "-m20000000 -w26" -DMUTANT_SHORT
  run mutant-answer-plumbed fail "-m20000000 -w26" -DMUTANT_ANSWER_PLUMBED
  run code-before-fix-lapse-fence fail "-m20000000 -w26" -DNO_FENCE_LAPSE
  run code-before-fix-handover-fence fail "-m20000000 -w26" -DNO_FENCE_HANDOVER
  run code-before-fix-epoch-confirm fail "-m20000000 -w26" -DEPOCH_CONFIRM
  run code-before-fix-release-overtakes fail "-m20000000 -w26" -DRELEASE_OVERTAKES
  run commits-height-rule-alone fail "-E -m100000 -w22" -DCOMMITS -DNO_VIEW_CHANGE -DVOTE_RULE=1
  run commits-no-rule-no-view-change fail "-E -m100000 -w22" -DCOMMITS -DNO_VIEW_CHANGE -DVOTE_RULE=0
fi

if [ $FAILED = 0 ]; then
  echo "model check: OK"
  exit 0
fi
echo "model check: FAILED"
exit 1
