/*
 * election.pml -- the VIP lease protocol of docs/ELECTION.md, and the configuration
 * commit rule of docs/CONFIG.md, as a Promela model for Spin. See docs/model/README.md.
 *
 * Two parts, one per run:
 *   (default)      VIP leases: 3 voters, 2 nodes, one VIP. Property: never two nodes
 *                  with the address on an interface (a crashed node's address counts).
 *   -DCOMMITS      configuration commits: 3 voters with a log, elections with the
 *                  up-to-date vote rule, the coordinator's view change. Property: a commit
 *                  acknowledged by a majority is in the log of every later coordinator.
 *
 * Style: one process, a loop of guarded atomic actions (one per possible event), all
 * state global. Time is discrete: `tick` is one action among the others, so any number
 * of events happen between two ticks, in any order.
 */

#ifndef COMMITS
/* ======================================================================================
 * Part 1: VIP leases
 *
 * Code <-> model (services/election.py = voters, services/vip.py = nodes):
 *   rpc_promise / rpc_release / grant_after   PROMISE / VOTER_REL / VOTER_CRASH (vwait)
 *   _ask (counts from t_req for L)            NODE_REQ (a reply counts L ticks when it
 *                                             comes back within the tick it was asked in,
 *                                             nothing when later)
 *   _handover / rpc_handover                  HANDOVER
 *   _evaluate + the expiry timer              NODE_PLUMB / NODE_LAPSE, and the tick guard:
 *                                             a holder whose count ran out unplumbs before
 *                                             the next tick (the timer's margin)
 *   _probe_clear (RFC 5227 ARP probe)         in NODE_PLUMB: answered by a crashed node's
 *                                             address only (no credit against live holders)
 *   _take_assignment                          NODE_VIEW (an owner reassigned keeps the
 *                                             address, uncounted renewals, until asked for
 *                                             the handover or its count runs out)
 *   node.vipcore.LeaseBook (the node's book)  cnt/csucc (counted), pend (successor promises
 *                                             awaiting a confirmation), forget_promises (fence)
 *   handle_init of vip (removes the address)  NODE_RESTART
 *
 * Abstractions (each one allows more than the code does, so a pass carries over):
 *   - Assignments: which node a voter's or a node's latest assignment names changes at
 *     any time, any number of times, in any order (the code orders them by (term, seq);
 *     lost, late and skipped ones give any sequence of views per member). A voter refuses
 *     or proceeds as if its assignment named either node, at every request.
 *   - Messages: any request may be answered, refused or lost, its reply lost or late; a
 *     voter may also answer a request the node will never count (an earlier one, held up:
 *     ORPHAN_REQ, at any time). Releases are lost or delivered late, not overtaking a
 *     later request of the same node to the same voter. The code does not need that order:
 *     a release carries the node's fence (`before`) and a voter drops only a promise last
 *     asked for before it; a release overtaken by a later request that was granted then
 *     drops nothing (as if lost first), one overtaken by a refused request drops what it
 *     would have dropped first (the refusal changed nothing: a fenced node counts nothing
 *     from that voter). -DRELEASE_OVERTAKES shows the order matters without `before`.
 *     Partitions are losses.
 *   - Crashes: any number, of voters (restart at once, forgetting every promise, granting
 *     nothing for PV ticks) and of nodes' vip services (the address stays on the
 *     interface until the service starts again or the kernel's valid_lft drops it).
 *   - Time: discrete ticks; clock rates equal; the drift allowance and the timer's margin
 *     are the voter's extra tick (PV = L + 1).
 *
 * The protocol as it should be is the default. Switches put back what services/vip.py
 * did before the fix (each one alone gives a double holder) or break a rule on purpose
 * (mutants, must fail):
 *   -DNO_FENCE        a node keeps counting promises it has released after its lease
 *                     lapsed (-DNO_FENCE_LAPSE) and promises older than a handover it
 *                     confirmed (-DNO_FENCE_HANDOVER)
 *   -DEPOCH_CONFIRM   one handover confirmation per wanting-epoch makes every successor
 *                     promise of that epoch count, also those granted after it (the code
 *                     until session 2: `confirmed[key]`, cleared at every fence)
 *   -DRELEASE_OVERTAKES  a release may arrive after later requests of the same node and drops
 *                     the node's promise whatever it is (the code until session 2: no
 *                     `before` in releases, sent from a task that later requests could precede)
 *   -DASIS            NO_FENCE and EPOCH_CONFIRM
 *   -DMUTANT_RENEW    a holder may renew while a successor exists
 *   -DMUTANT_NOHANDOVER  successor promises count without the holder's confirmation
 *   -DMUTANT_SHORT    voters promise for PV = L (no margin)
 *   -DMUTANT_ANSWER_PLUMBED  a handing-over holder confirms the handover before it unplumbs
 * -DNO_CRASHES and -DNO_ORPHANS leave those events out: a smaller space, for finding short
 * counterexamples with a breadth-first search (-DBFS) and for the quick test.
 * ====================================================================================== */

#ifdef ASIS
#define NO_FENCE
#define EPOCH_CONFIRM
#endif
#ifdef NO_FENCE
#define NO_FENCE_LAPSE
#define NO_FENCE_HANDOVER
#endif

#define NV 3                 /* voters */
#define NN 2                 /* nodes */
#define Q 2                  /* majority of NV */
#ifndef L
#define L 1                  /* the node counts a promise for L ticks from sending its request */
#endif
#ifdef MUTANT_SHORT
#define PV (L)
#else
#define PV (L + 1)           /* a voter keeps a promise PV ticks from granting it */
#endif

#define NOBODY 2
#define I(n, v) ((n) * NV + (v))
#define OTHER(n) (1 - (n))

/* voter answers */
#define R_CUR 1              /* granted, current promise */
#define R_SUCC 2             /* granted, successor promise "after the other node" */
#define R_NO 3               /* refused */

/* voters (services/election.py) */
byte cur[NV];                /* holder of the current promise, or NOBODY */
byte curt[NV];               /* ticks left on it */
byte suc[NV];                /* holder of the successor promise, or NOBODY */
byte suct[NV];
byte vwait[NV];              /* ticks left of grant_after */

/* nodes (services/vip.py) */
bool nalive[NN];             /* the vip service runs */
bool plumbed[NN];            /* the address is on n's interface (also while n is dead) */
bool mine[NN];               /* n's latest assignment names n */
byte cnt[NN * NV];           /* ticks left on the counted promise from voter v */
bool csucc[NN * NV];         /* ... which is a (confirmed) successor promise */
byte pend[NN * NV];          /* successor promise waiting for the holder's confirmation */
bool conf[NN];               /* EPOCH_CONFIRM: the other node confirmed in this epoch */

bool rel[NN * NV];           /* a release cast on its way */

byte k;                      /* scratch, always reset to 0 */
byte ans;                    /* scratch, always reset to 0 */

#define MINE(n) (nalive[n] && mine[n])

#ifdef EPOCH_CONFIRM
#define CONFIRMED(n) conf[n]
#else
#define CONFIRMED(n) 1
#endif
#define COUNTS(n, v) (cnt[I(n, v)] > 0 && (!csucc[I(n, v)] || CONFIRMED(n)))
#define QUORUM(n) (COUNTS(n, 0) + COUNTS(n, 1) + COUNTS(n, 2) >= Q)
#define CS(n, v) (cnt[I(n, v)] > 0 && csucc[I(n, v)] && CONFIRMED(n))

/* may the node plumb without an ARP probe? Once a counted successor promise is confirmed
   (_probe_clear: self.confirmed[key] not empty) */
#ifdef EPOCH_CONFIRM
#define NO_PROBE(n) conf[n]
#else
#define NO_PROBE(n) (CS(n, 0) + CS(n, 1) + CS(n, 2) >= 1)
#endif

inline forget_promises(n) {
  for (k : 0 .. NV - 1) {
    cnt[I(n, k)] = 0; csucc[I(n, k)] = 0; pend[I(n, k)] = 0
  }
  k = 0;
  conf[n] = 0               /* EPOCH_CONFIRM: _fence cleared confirmed[key] */
}

/* _release_everywhere: a release cast to every voter */
inline release_all(n) {
  for (k : 0 .. NV - 1) {
    rel[I(n, k)] = 1
  }
  k = 0
}

/* the holder lost its majority (a refusal or the expiry timer): unplumb, release.
   The fence: the node forgets the promises it releases (NO_FENCE: the code kept them). */
inline lapse(n) {
  plumbed[n] = 0;
#ifndef NO_FENCE_LAPSE
  forget_promises(n);
#endif
  release_all(n)
}

inline promote(v) {
  if
  :: cur[v] == NOBODY && suc[v] != NOBODY -> cur[v] = suc[v]; curt[v] = suct[v]; suc[v] = NOBODY; suct[v] = 0
  :: else
  fi
}

/* rpc_promise: voter v's answer to node n, into ans. First choice: the voter's latest
   assignment names someone else (or none since its restart): refused. */
#ifdef MUTANT_RENEW
#define RENEW_PAST_SUCCESSOR(v) 0
#else
#define RENEW_PAST_SUCCESSOR(v) (suc[v] != NOBODY)
#endif
#define PROMISE(n, v) \
       if \
       :: ans = R_NO; printf("V%d refuses %c: its assignment names another node\n", v, 'A' + n) \
       :: vwait[v] > 0 -> ans = R_NO; printf("V%d refuses %c: restarting\n", v, 'A' + n) \
       :: vwait[v] == 0 -> \
          if \
          :: cur[v] == NOBODY -> cur[v] = n; curt[v] = PV; ans = R_CUR; \
             printf("V%d promises to %c (current, %d ticks)\n", v, 'A' + n, PV) \
          :: cur[v] == (n) && RENEW_PAST_SUCCESSOR(v) -> ans = R_NO; \
             printf("V%d refuses %c: being handed over\n", v, 'A' + n) \
          :: cur[v] == (n) && !RENEW_PAST_SUCCESSOR(v) -> curt[v] = PV; ans = R_CUR; \
             printf("V%d renews %c's promise (%d ticks)\n", v, 'A' + n, PV) \
          :: cur[v] == OTHER(n) -> suc[v] = n; suct[v] = PV; ans = R_SUCC; \
             printf("V%d promises to %c after %c (successor, %d ticks)\n", v, 'A' + n, 'A' + OTHER(n), PV) \
          fi \
       fi

/* _ask then _evaluate: node n takes voter v's answer, counting `left` ticks */
#ifdef MUTANT_NOHANDOVER
#define TAKE_SUCC(n, v, left) cnt[I(n, v)] = left; csucc[I(n, v)] = 1; conf[n] = 1
#else
#ifdef EPOCH_CONFIRM
#define TAKE_SUCC(n, v, left) cnt[I(n, v)] = left; csucc[I(n, v)] = 1
#else
#define TAKE_SUCC(n, v, left) pend[I(n, v)] = left
#endif
#endif
#define TAKE(n, v, left) \
       if \
       :: ans == R_CUR -> cnt[I(n, v)] = left; csucc[I(n, v)] = 0; pend[I(n, v)] = 0 \
       :: ans == R_SUCC -> TAKE_SUCC(n, v, left) \
       :: ans == R_NO -> cnt[I(n, v)] = 0; csucc[I(n, v)] = 0; pend[I(n, v)] = 0 \
       fi; \
       if \
       :: plumbed[n] && !QUORUM(n) -> printf("  %c lost its majority: unplumbs, releases everywhere\n", 'A' + n); lapse(n) \
       :: else \
       fi

/* ---- a promise request from node n to voter v, its answer and its reply, one step.
   The reply comes back within the tick (counts L), or later (counts nothing, but a
   refusal or a successor reply still replaces the entry, as in _ask), or never. A release
   n sent earlier to v is delivered (or lost) first (see the abstractions above). ---- */
#ifdef RELEASE_OVERTAKES
#define REL_FIRST(n, v) 1
#else
#define REL_FIRST(n, v) !rel[I(n, v)]
#endif
#define NODE_REQ(n, v) \
  :: atomic { MINE(n) && REL_FIRST(n, v) -> \
       printf("%c asks V%d for a promise\n", 'A' + n, v); \
       PROMISE(n, v); \
       if \
       :: printf("  reply reaches %c in time (counts %d ticks)\n", 'A' + n, L); TAKE(n, v, L) \
       :: printf("  reply reaches %c late (counts nothing)\n", 'A' + n); TAKE(n, v, 0) \
       :: printf("  reply lost\n") \
       fi; \
       ans = 0 }

/* ---- voter v answers a request of node n that n will not count (held up, and n has
   since timed it out, fenced, restarted or stopped wanting). Any time. ---- */
#define ORPHAN_REQ(n, v) \
  :: atomic { vwait[v] == 0 && (cur[v] == NOBODY || cur[v] == (n) && suc[v] == NOBODY || cur[v] == OTHER(n) && suc[v] != (n)) -> \
       printf("an old request of %c reaches V%d (%c will ignore the reply)\n", 'A' + n, v, 'A' + n); \
       PROMISE(n, v); \
       ans = 0 }

/* ---- voter v receives node n's release: rpc_release ---- */
#define VOTER_REL(n, v) \
  :: d_step { rel[I(n, v)] -> \
       printf("V%d gets %c's release\n", v, 'A' + n); \
       if \
       :: cur[v] == (n) -> cur[v] = NOBODY; curt[v] = 0; promote(v) \
       :: else \
       fi; \
       if \
       :: suc[v] == (n) -> suc[v] = NOBODY; suct[v] = 0 \
       :: else \
       fi; \
       rel[I(n, v)] = 0 }

#define REL_LOST(n, v) \
  :: d_step { rel[I(n, v)] -> rel[I(n, v)] = 0; printf("%c's release to V%d is lost\n", 'A' + n, v) }

/* ---- handover: node n asks the other node h to confirm it does not hold the VIP ----
   h answers once the address is off its interface (rpc_handover waits); with the fence
   it also forgets its own promises then. The confirmation covers the successor promises
   n had received when it asked (the round trip is one step here; a reply that arrives
   later, or never, confirms less). EPOCH_CONFIRM: the code's rule, one confirmation per
   wanting-epoch covering every successor promise of that epoch. */
#ifdef EPOCH_CONFIRM
#define WANTS_HANDOVER(n) (!conf[n] && (csucc[I(n, 0)] && cnt[I(n, 0)] > 0 || csucc[I(n, 1)] && cnt[I(n, 1)] > 0 || csucc[I(n, 2)] && cnt[I(n, 2)] > 0))
#define CONFIRM(n) conf[n] = 1
#else
#define WANTS_HANDOVER(n) (pend[I(n, 0)] > 0 || pend[I(n, 1)] > 0 || pend[I(n, 2)] > 0)
#define CONFIRM1(n, v) if :: pend[I(n, v)] > 0 -> cnt[I(n, v)] = pend[I(n, v)]; csucc[I(n, v)] = 1; pend[I(n, v)] = 0 :: else fi
#define CONFIRM(n) CONFIRM1(n, 0); CONFIRM1(n, 1); CONFIRM1(n, 2)
#endif
#ifdef NO_FENCE_HANDOVER
#define HOLDER_FENCE(h) skip
#else
#define HOLDER_FENCE(h) forget_promises(h)
#endif
/* A holder whose assignment names the other node (handing over) unplumbs when asked, then
   answers; one still assigned the address does not answer (it waits for the assignment).
   MUTANT_ANSWER_PLUMBED: it answers first and keeps the address (must fail). */
#ifdef MUTANT_ANSWER_PLUMBED
#define UNPLUMB_TO_ANSWER(h) skip
#else
#define UNPLUMB_TO_ANSWER(h) lapse(h)
#endif
#define HANDOVER(n) \
  :: d_step { MINE(n) && WANTS_HANDOVER(n) && nalive[OTHER(n)] && (!plumbed[OTHER(n)] || !mine[OTHER(n)]) -> \
       if \
       :: plumbed[OTHER(n)] -> printf("%c asks %c for the handover: %c (handing over) unplumbs, releases, confirms\n", 'A' + n, 'A' + OTHER(n), 'A' + OTHER(n)); \
          UNPLUMB_TO_ANSWER(OTHER(n)) \
       :: else -> printf("%c asks %c for the handover: %c does not hold the address, confirms\n", 'A' + n, 'A' + OTHER(n), 'A' + OTHER(n)) \
       fi; \
       HOLDER_FENCE(OTHER(n)); CONFIRM(n) }

/* ---- node n plumbs: _evaluate with a majority. The ARP probe and the plumb are one
   step, and the probe is answered only by the address of a node whose service is dead
   (what it is for): a live holder is never seen by it, so the probe gets no credit for
   the lease rule's job (conservative). ---- */
#define NODE_PLUMB(n) \
  :: d_step { MINE(n) && !plumbed[n] && QUORUM(n) && (NO_PROBE(n) || nalive[OTHER(n)] || !plumbed[OTHER(n)]) -> \
       plumbed[n] = 1; \
       printf("%c PLUMBS the address (promises from V0 V1 V2: %d %d %d ticks)\n", 'A' + n, cnt[I(n, 0)], cnt[I(n, 1)], cnt[I(n, 2)]); \
       assert(!(plumbed[0] && plumbed[1])) }

/* ---- the expiry timer ---- */
#define NODE_LAPSE(n) \
  :: d_step { nalive[n] && plumbed[n] && !QUORUM(n) -> \
       printf("%c's lease lapsed: unplumbs, releases everywhere\n", 'A' + n); lapse(n) }

/* ---- n's latest assignment changes: _take_assignment ---- */
#ifdef EPOCH_CONFIRM
#define NEW_EPOCH(n) conf[n] = 0
#else
#define NEW_EPOCH(n) skip
#endif
#define NODE_VIEW(n) \
  :: d_step { nalive[n] -> \
       if \
       :: mine[n] && plumbed[n] -> \
          printf("%c's assignment now names the other node: keeps serving until asked (or its lease lapses)\n", 'A' + n); \
          mine[n] = 0; NEW_EPOCH(n) \
       :: mine[n] && !plumbed[n] -> \
          printf("%c's assignment now names the other node: release\n", 'A' + n); \
          mine[n] = 0; release_all(n); forget_promises(n); NEW_EPOCH(n) \
       :: else -> \
          printf("%c's assignment now names %c\n", 'A' + n, 'A' + n); \
          mine[n] = 1; NEW_EPOCH(n) \
       fi }

/* ---- crashes ---- */
#define VOTER_CRASH(v) \
  :: d_step { vwait[v] < PV -> \
       printf("V%d crashes and restarts (forgets its promises)\n", v); \
       cur[v] = NOBODY; curt[v] = 0; suc[v] = NOBODY; suct[v] = 0; vwait[v] = PV }

/* the vip service dies: the address stays (kill -9, or the machine's processes die) */
#define NODE_CRASH(n) \
  :: d_step { nalive[n] -> printf("%c's vip service crashes (the address stays)\n", 'A' + n); nalive[n] = 0; mine[n] = 0; conf[n] = 0; forget_promises(n) }

/* the vip service starts again: handle_init removes the address it finds */
#define NODE_RESTART(n) \
  :: d_step { !nalive[n] -> printf("%c's vip service restarts, removes the address\n", 'A' + n); nalive[n] = 1; plumbed[n] = 0 }

/* the kernel drops a dead node's address when its valid_lft runs out */
#define KERNEL_EXPIRY(n) \
  :: d_step { !nalive[n] && plumbed[n] -> printf("the kernel drops %c's address\n", 'A' + n); plumbed[n] = 0 }

/* ---- time ---- */
#define DEC(x) if :: x > 0 -> x-- :: else fi
#define HOLDER_LATE(n) (nalive[n] && plumbed[n] && !QUORUM(n))

inline tick() {
  for (k : 0 .. NV - 1) {
    DEC(curt[k]); DEC(suct[k]); DEC(vwait[k]);
    if :: curt[k] == 0 -> cur[k] = NOBODY :: else fi;
    if :: suct[k] == 0 -> suc[k] = NOBODY :: else fi;
    promote(k)
  }
  for (k : 0 .. NN * NV - 1) {
    DEC(cnt[k]);
    if :: cnt[k] == 0 -> csucc[k] = 0 :: else fi;
    DEC(pend[k])
  }
  k = 0
}

init {
  d_step {
    for (k : 0 .. NV - 1) { cur[k] = NOBODY; suc[k] = NOBODY }
    for (k : 0 .. NN - 1) { nalive[k] = 1 }
    k = 0
  };
  do
  /* time passes; a holder whose count ran out must have unplumbed (its timer's margin) */
  :: d_step { !HOLDER_LATE(0) && !HOLDER_LATE(1) -> printf("--- tick\n"); tick() }

  NODE_REQ(0, 0) NODE_REQ(0, 1) NODE_REQ(0, 2) NODE_REQ(1, 0) NODE_REQ(1, 1) NODE_REQ(1, 2)
#ifndef NO_ORPHANS
  ORPHAN_REQ(0, 0) ORPHAN_REQ(0, 1) ORPHAN_REQ(0, 2) ORPHAN_REQ(1, 0) ORPHAN_REQ(1, 1) ORPHAN_REQ(1, 2)
#endif
  VOTER_REL(0, 0) VOTER_REL(0, 1) VOTER_REL(0, 2) VOTER_REL(1, 0) VOTER_REL(1, 1) VOTER_REL(1, 2)
  REL_LOST(0, 0) REL_LOST(0, 1) REL_LOST(0, 2) REL_LOST(1, 0) REL_LOST(1, 1) REL_LOST(1, 2)
  HANDOVER(0) HANDOVER(1)
  NODE_PLUMB(0) NODE_PLUMB(1)
  NODE_LAPSE(0) NODE_LAPSE(1)
  NODE_VIEW(0) NODE_VIEW(1)
#ifndef NO_CRASHES
  VOTER_CRASH(0) VOTER_CRASH(1) VOTER_CRASH(2)
  NODE_CRASH(0) NODE_CRASH(1)
  NODE_RESTART(0) NODE_RESTART(1)
  KERNEL_EXPIRY(0) KERNEL_EXPIRY(1)
#endif
  od
}

#else
/* ======================================================================================
 * Part 2: configuration commits (-DCOMMITS)
 *
 * A small abstraction of services/election.py (votes) and services/configsync.py (the
 * coordinator's view change, store, acknowledgement). Three voters, each with a durable
 * term (election.json's term and config.promised merged), a log (the terms in which the
 * commits of its `main` were made, oldest first), and a stamp (config.height's stamp).
 *
 *   STAND(c)      c wins an election for term[c] + 1 with the votes of a majority (c and
 *                 one or two others). A voter gives its vote once per term (the term
 *                 rises) and only under the up-to-date rule (VOTE_RULE):
 *                   0  none
 *                   1  candidate's height >= the voter's (rpc_vote's config_height rule)
 *                   2  candidate's (stamp, height) >= the voter's (Raft's rule)
 *   ESTABLISH(c)  configsync's view change: c collects the positions of a majority (each
 *                 promising c's term), adopts the most advanced main by (stamp, height),
 *                 restamps it with its term and stores it on a majority; only then does it
 *                 take commits. -DNO_VIEW_CHANGE leaves this out (a coordinator takes
 *                 commits at once, with whatever it has: the vote rule alone must do).
 *   COMMIT(c)     an established coordinator appends a commit of its term.
 *   STORE(c, v)   v stores c's main when c's term is not older than v's promise.
 *   ACK(c)        a majority hold c's whole main: c's last commit is acknowledged.
 *   CRASH(c)      c forgets it was coordinator (durable state stays).
 * Elections and view changes are single steps; everything else interleaves freely, with
 * any number of coordinators of different terms alive at once (stale ones too).
 *
 * Property: every commit ever acknowledged is in the main of every coordinator, checked
 * when the coordinator starts taking commits (after its view change, or right at its
 * election with -DNO_VIEW_CHANGE).
 * ====================================================================================== */

#define NM 3                 /* voters */
#define QM 2                 /* majority */
#ifndef MAXT
#define MAXT 4               /* terms 1..MAXT */
#endif
#ifndef MAXLEN
#define MAXLEN 3             /* commits per log */
#endif
#ifndef VOTE_RULE
#define VOTE_RULE 1
#endif

byte term[NM];               /* highest term voted for / promised */
byte lead[NM];               /* the term m is coordinator of (0: none) */
bool est[NM];                /* ... and has finished its view change */
byte height[NM];                /* height of m's main */
byte logt[NM * MAXLEN];      /* term of each commit of m's main */
byte stamp[NM];              /* the term whose history m's main is a prefix of */
byte ackt[MAXLEN];           /* ghost: term of the acknowledged commit at each height */
byte acklen;                 /* ghost: height of the longest acknowledged history */
byte i, j, best;             /* scratch, always reset to 0 */

#define LOG(m, x) logt[(m) * MAXLEN + (x)]

#if VOTE_RULE == 0
#define UP_TO_DATE(c, v) 1
#elif VOTE_RULE == 1
#define UP_TO_DATE(c, v) (height[c] >= height[v])
#else
#define UP_TO_DATE(c, v) (stamp[c] > stamp[v] || stamp[c] == stamp[v] && height[c] >= height[v])
#endif
#define MORE_ADVANCED(a, b) (stamp[a] > stamp[b] || stamp[a] == stamp[b] && height[a] > height[b])
#define GRANTS(c, v, t) (term[v] < (t) && UP_TO_DATE(c, v))

/* does m's main hold every acknowledged commit? */
inline check_holds(m) {
  for (i : 0 .. MAXLEN - 1) {
    if
    :: i < acklen -> assert(height[m] > i && LOG(m, i) == ackt[i])
    :: else
    fi
  }
  i = 0
}

/* v's main becomes a copy of c's (configsync store: fast-forward, or reset of commits
   from an older term that never reached a majority) */
inline copy_main(c, v) {
  for (i : 0 .. MAXLEN - 1) { LOG(v, i) = LOG(c, i) }
  height[v] = height[c]; i = 0
}

inline store(c, v, t) {
  copy_main(c, v); stamp[v] = t; term[v] = t
}

#ifdef NO_VIEW_CHANGE
#define ELECTED(c, t) lead[c] = t; est[c] = 1; check_holds(c)
#else
#define ELECTED(c, t) lead[c] = t; est[c] = 0
#endif

/* c stands for term[c] + 1 and wins with the votes of voters a and, optionally, b */
#define STAND(c, a, b) \
  :: d_step { term[c] < MAXT && GRANTS(c, a, term[c] + 1) -> \
       j = term[c] + 1; \
       term[c] = j; term[a] = j; \
       if :: GRANTS(c, b, j) -> term[b] = j :: else fi; \
       printf("m%d is elected coordinator of term %d with m%d's vote, its main: height %d stamp %d\n", c, j, a, height[c], stamp[c]); \
       ELECTED(c, j); j = 0 }

/* configsync's view change with the positions of c and a (b promises too when it can);
   then the adopted main, restamped, is stored on c and a, which is a majority */
#define ESTABLISH(c, a, b) \
  :: d_step { lead[c] != 0 && lead[c] == term[c] && !est[c] && term[a] <= lead[c] -> \
       j = lead[c]; term[a] = j; \
       best = c; \
       if :: MORE_ADVANCED(a, best) -> best = a :: else fi; \
       if :: term[b] <= j -> term[b] = j; if :: MORE_ADVANCED(b, best) -> best = b :: else fi :: else fi; \
       printf("m%d's view change (positions of m%d and m%d): adopts m%d's main, height %d stamp %d\n", c, c, a, best, height[best], stamp[best]); \
       copy_main(best, c); stamp[c] = j; \
       store(c, a, j); \
       est[c] = 1; \
       check_holds(c); \
       best = 0; j = 0 }

#define COMMIT(c) \
  :: d_step { est[c] && lead[c] == term[c] && height[c] < MAXLEN -> \
       LOG(c, height[c]) = lead[c]; height[c]++; stamp[c] = lead[c]; \
       printf("m%d commits #%d (term %d) on its own main\n", c, height[c], lead[c]) }

#define STORE(c, v) \
  :: d_step { est[c] && lead[c] >= term[v] && lead[c] != 0 -> \
       printf("m%d stores m%d's main (height %d, term %d)\n", v, c, height[c], lead[c]); store(c, v, lead[c]) }

/* a majority (c and v) hold c's main as it is: its last commit is acknowledged */
#define SAME_MAIN(c, v) (height[v] == height[c] && (height[c] < 1 || LOG(v, 0) == LOG(c, 0)) && (height[c] < 2 || LOG(v, 1) == LOG(c, 1)) && (height[c] < 3 || LOG(v, 2) == LOG(c, 2)))
#define ACK(c, v) \
  :: d_step { est[c] && height[c] > 0 && SAME_MAIN(c, v) && !(acklen == height[c] && ackt[height[c] - 1] == LOG(c, height[c] - 1)) -> \
       for (i : 0 .. MAXLEN - 1) { if :: i < acklen -> assert(height[c] > i && LOG(c, i) == ackt[i]) :: else fi } \
       for (i : 0 .. MAXLEN - 1) { ackt[i] = LOG(c, i) } \
       acklen = height[c]; i = 0; \
       printf("m%d and m%d hold it: commit #%d (term %d) ACKNOWLEDGED\n", c, v, height[c], LOG(c, height[c] - 1)) }

#define STEP_DOWN(c) \
  :: d_step { lead[c] != 0 && (lead[c] != term[c]) -> lead[c] = 0; est[c] = 0 }

#define CRASH(c) \
  :: d_step { lead[c] != 0 -> lead[c] = 0; est[c] = 0 }

init {
  do
  STAND(0, 1, 2) STAND(0, 2, 1) STAND(1, 0, 2) STAND(1, 2, 0) STAND(2, 0, 1) STAND(2, 1, 0)
  ESTABLISH(0, 1, 2) ESTABLISH(0, 2, 1) ESTABLISH(1, 0, 2) ESTABLISH(1, 2, 0) ESTABLISH(2, 0, 1) ESTABLISH(2, 1, 0)
  COMMIT(0) COMMIT(1) COMMIT(2)
  STORE(0, 1) STORE(0, 2) STORE(1, 0) STORE(1, 2) STORE(2, 0) STORE(2, 1)
  ACK(0, 1) ACK(0, 2) ACK(1, 0) ACK(1, 2) ACK(2, 0) ACK(2, 1)
  STEP_DOWN(0) STEP_DOWN(1) STEP_DOWN(2)
  CRASH(0) CRASH(1) CRASH(2)
  od
}
#endif
