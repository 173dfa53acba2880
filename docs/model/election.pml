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
 *   rpc_promise / rpc_release / grant_after   VOTER_REQ / VOTER_REL / vcrash (vwait = PV)
 *   _ask (count from t_req, L)                NODE_REQ + NODE_REP (rrem counts down from
 *                                             the moment the request was sent)
 *   _handover / rpc_handover                  NODE_HREQ / HOLDER_ANSWERS / NODE_HREP
 *   _evaluate + the expiry timer              NODE_PLUMB / NODE_LAPSE (+ the tick guard:
 *                                             a holder whose count ran out unplumbs before
 *                                             the next tick = the timer's margin)
 *   _probe_clear (RFC 5227 ARP probe)         NODE_PLUMB (answered by a crashed node's
 *                                             address only: no credit against live holders)
 *   _take_assignment (late, lost, skipped)    NODE_VIEW / LEARN_VIEW jump to any newer
 *                                             assignment, never back (seq order)
 *   handle_init of vip (removes the address)  NODE_RESTART
 * Messages: one request slot per (node, voter), overwritten by a resend (the old reply is
 * then ignored, like a call that timed out); a request never answered is a lost one. A
 * release (cast) keeps its FIFO place relative to the request on the same connection
 * (ZeroMQ keeps order per connection) and may be lost. Partitions are losses.
 *
 * The protocol as it should be (docs/ELECTION.md, "the node's rule") is the default.
 * Compile-time switches put back what the code did before (each one finds a double
 * holder) or break a rule on purpose (mutants, must fail):
 *   -DNO_FENCE        a node keeps its promises after it unplumbed and released, and after
 *                     it confirmed a handover; late replies to earlier requests count
 *   -DEPOCH_CONFIRM   one handover confirmation per wanting-epoch covers every successor
 *                     promise, also those granted after the confirmation
 *   -DPROBE_SKIP_ANY  no ARP probe as soon as any handover was confirmed
 *   -DASIS            all three (services/vip.py before the fix)
 *   -DMUTANT_RENEW    a holder may renew while a successor exists
 *   -DMUTANT_NOHANDOVER  successor promises count without the holder's confirmation
 *   -DMUTANT_SHORT    voters promise for PV = L (no margin)
 * ====================================================================================== */

#ifdef ASIS
#define NO_FENCE
#define EPOCH_CONFIRM
#define PROBE_SKIP_ANY
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
#ifndef MAXSEQ
#define MAXSEQ 3             /* assignment changes: A, B, A, B */
#endif
#ifndef NCRASH
#define NCRASH 1             /* node crashes (vip service killed; the address stays) */
#endif
#ifndef VCRASH
#define VCRASH 1             /* voter crashes (restarts at once, forgetting its promises) */
#endif

#define NOBODY 2
#define NOVIEW 255
#define I(n, v) ((n) * NV + (v))
#define OTHER(n) (1 - (n))

/* message slot states */
#define IDLE 0
#define REQ 1                /* request on its way to the voter (or to the holder: handover) */
#define R_CUR 2              /* reply: granted, current promise */
#define R_SUCC 3             /* reply: granted, successor promise "after the other node" */
#define R_NO 4               /* reply: refused (handover: "still held") */
#define H_YES 2              /* handover answer: released */

/* the coordinator's assignments, in order; views are indices into this */
byte owner[MAXSEQ + 1];
byte gseq;

/* voters (services/election.py) */
byte cur[NV];                /* holder of the current promise, or NOBODY */
byte curt[NV];               /* ticks left on it */
byte suc[NV];                /* holder of the successor promise, or NOBODY */
byte suct[NV];
byte vwait[NV];              /* ticks left of grant_after */
byte vview[NV];              /* latest assignment seen */
byte vcrashes;

/* nodes (services/vip.py) */
bool nalive[NN];
bool plumbed[NN];            /* the address is on n's interface (also while n is dead) */
byte nview[NN];
byte cnt[NN * NV];           /* ticks left on the counted promise from voter v */
bool csucc[NN * NV];         /* ... which is a (confirmed) successor promise */
byte pend[NN * NV];          /* successor promise waiting for the holder's confirmation */
bool psnap[NN * NV];         /* ... received before the handover request in flight was sent */
bool conf[NN];               /* EPOCH_CONFIRM: the other node confirmed in this epoch */
bool hvalid[NN];             /* EPOCH_CONFIRM: epoch unchanged since the handover request */
byte ncrashes;

/* messages */
byte rq[NN * NV];            /* promise request / reply slot */
byte rrem[NN * NV];          /* ticks the node would count a grant arriving now: L - age */
bool rstale[NN * NV];        /* the node will ignore the reply (fenced or restarted since) */
bool rel[NN * NV];           /* a release cast on its way */
bool relfirst[NN * NV];      /* ... sent before the pending request (FIFO on one connection) */
byte hq[NN];                 /* handover request from node n to the other node, or its answer */

byte k;                      /* scratch, always reset to 0 */
bool bfr;                    /* scratch, always reset to 0 */

#define MINE(n) (nalive[n] && nview[n] != NOVIEW && owner[nview[n]] == (n))

#ifdef EPOCH_CONFIRM
#define CONFIRMED(n) conf[n]
#else
#define CONFIRMED(n) 1
#endif
#ifdef MUTANT_NOHANDOVER
#define COUNTS(n, v) (cnt[I(n, v)] > 0)
#else
#define COUNTS(n, v) (cnt[I(n, v)] > 0 && (!csucc[I(n, v)] || CONFIRMED(n)))
#endif
#define QUORUM(n) (COUNTS(n, 0) + COUNTS(n, 1) + COUNTS(n, 2) >= Q)

/* may the node plumb without an ARP probe? */
#ifdef PROBE_SKIP_ANY
#ifdef EPOCH_CONFIRM
#define NO_PROBE(n) conf[n]
#else
#define NO_PROBE(n) (csucc[I(n, 0)] && cnt[I(n, 0)] > 0 || csucc[I(n, 1)] && cnt[I(n, 1)] > 0 || csucc[I(n, 2)] && cnt[I(n, 2)] > 0)
#endif
#else
/* only when a majority of the counted promises are confirmed successor promises */
#define CS(n, v) (cnt[I(n, v)] > 0 && csucc[I(n, v)])
#define NO_PROBE(n) (CS(n, 0) + CS(n, 1) + CS(n, 2) >= Q)
#endif

/* a node forgets its promises and ignores replies to requests sent before now */
inline fence(n) {
  for (k : 0 .. NV - 1) {
    cnt[I(n, k)] = 0; csucc[I(n, k)] = 0; pend[I(n, k)] = 0; psnap[I(n, k)] = 0;
    if
    :: rq[I(n, k)] != IDLE -> rstale[I(n, k)] = 1
    :: else
    fi
  }
  k = 0
}

/* what the code clears when a VIP stops being ours (_take_assignment) */
inline forget_promises(n) {
  for (k : 0 .. NV - 1) {
    cnt[I(n, k)] = 0; csucc[I(n, k)] = 0; pend[I(n, k)] = 0; psnap[I(n, k)] = 0
  }
  k = 0
}

/* _release_everywhere: a release cast to every voter, behind any request in flight */
inline release_all(n) {
  for (k : 0 .. NV - 1) {
    rel[I(n, k)] = 1;
    relfirst[I(n, k)] = (rq[I(n, k)] != REQ)
  }
  k = 0
}

/* the holder lost its majority (a refusal or the expiry timer): unplumb, release */
inline lapse(n) {
  plumbed[n] = 0;
#ifndef NO_FENCE
  fence(n);
#endif
  release_all(n)
}

inline promote(v) {
  if
  :: cur[v] == NOBODY && suc[v] != NOBODY -> cur[v] = suc[v]; curt[v] = suct[v]; suc[v] = NOBODY; suct[v] = 0
  :: else
  fi
}

/* ---- node n asks voter v for a promise (renewal loop, or a fresh want) ---- */
#define NODE_REQ(n, v) \
  :: d_step { MINE(n) && !(rq[I(n, v)] == REQ && rrem[I(n, v)] == L && !rstale[I(n, v)]) -> \
       relfirst[I(n, v)] = rel[I(n, v)]; rq[I(n, v)] = REQ; rrem[I(n, v)] = L; rstale[I(n, v)] = 0 }

/* ---- voter v answers node n's request: rpc_promise ---- */
#ifdef MUTANT_RENEW
#define RENEW_PAST_SUCCESSOR(v) 0
#else
#define RENEW_PAST_SUCCESSOR(v) (suc[v] != NOBODY)
#endif
#define VOTER_REQ(n, v) \
  :: atomic { rq[I(n, v)] == REQ && !(rel[I(n, v)] && relfirst[I(n, v)]) -> \
       LEARN_VIEW(v); \
       if \
       :: vwait[v] > 0 || vview[v] == NOVIEW -> rq[I(n, v)] = R_NO \
       :: vwait[v] == 0 && vview[v] != NOVIEW && owner[vview[v]] != (n) -> rq[I(n, v)] = R_NO \
       :: vwait[v] == 0 && vview[v] != NOVIEW && owner[vview[v]] == (n) -> \
          if \
          :: cur[v] == NOBODY -> cur[v] = n; curt[v] = PV; rq[I(n, v)] = R_CUR \
          :: cur[v] == (n) && RENEW_PAST_SUCCESSOR(v) -> rq[I(n, v)] = R_NO \
          :: cur[v] == (n) && !RENEW_PAST_SUCCESSOR(v) -> curt[v] = PV; rq[I(n, v)] = R_CUR \
          :: cur[v] == OTHER(n) -> suc[v] = n; suct[v] = PV; rq[I(n, v)] = R_SUCC \
          fi \
       fi }

/* ---- node n receives voter v's reply: _ask, then _evaluate ---- */
#ifdef EPOCH_CONFIRM
#define TAKE_SUCC(n, v) cnt[I(n, v)] = rrem[I(n, v)]; csucc[I(n, v)] = 1
#else
#define TAKE_SUCC(n, v) pend[I(n, v)] = rrem[I(n, v)]; psnap[I(n, v)] = 0
#endif
#ifdef MUTANT_NOHANDOVER
#undef TAKE_SUCC
#define TAKE_SUCC(n, v) cnt[I(n, v)] = rrem[I(n, v)]; csucc[I(n, v)] = 1
#endif
#define NODE_REP(n, v) \
  :: d_step { rq[I(n, v)] >= R_CUR -> \
       if \
       :: rstale[I(n, v)] || !MINE(n) -> skip \
       :: else -> \
          if \
          :: rq[I(n, v)] == R_CUR -> cnt[I(n, v)] = rrem[I(n, v)]; csucc[I(n, v)] = 0; pend[I(n, v)] = 0; psnap[I(n, v)] = 0 \
          :: rq[I(n, v)] == R_SUCC -> TAKE_SUCC(n, v) \
          :: rq[I(n, v)] == R_NO -> cnt[I(n, v)] = 0; csucc[I(n, v)] = 0; pend[I(n, v)] = 0; psnap[I(n, v)] = 0 \
          fi; \
          if \
          :: plumbed[n] && !QUORUM(n) -> lapse(n) \
          :: else \
          fi \
       fi; \
       rq[I(n, v)] = IDLE; rrem[I(n, v)] = 0; rstale[I(n, v)] = 0; relfirst[I(n, v)] = rel[I(n, v)] }

/* ---- voter v receives node n's release: rpc_release ---- */
#define VOTER_REL(n, v) \
  :: d_step { rel[I(n, v)] && !(rq[I(n, v)] == REQ && !relfirst[I(n, v)]) -> \
       if \
       :: cur[v] == (n) -> cur[v] = NOBODY; curt[v] = 0; promote(v) \
       :: else \
       fi; \
       if \
       :: suc[v] == (n) -> suc[v] = NOBODY; suct[v] = 0 \
       :: else \
       fi; \
       rel[I(n, v)] = 0; relfirst[I(n, v)] = 0 }

#define REL_LOST(n, v) \
  :: d_step { rel[I(n, v)] -> rel[I(n, v)] = 0; relfirst[I(n, v)] = 0 }

/* ---- handover: node n asks the other node to confirm it does not hold the VIP ---- */
#ifdef EPOCH_CONFIRM
#define WANTS_HANDOVER(n) (MINE(n) && !conf[n] && (csucc[I(n, 0)] && cnt[I(n, 0)] > 0 || csucc[I(n, 1)] && cnt[I(n, 1)] > 0 || csucc[I(n, 2)] && cnt[I(n, 2)] > 0))
#define SNAPSHOT(n) hvalid[n] = 1
#else
#define WANTS_HANDOVER(n) (MINE(n) && (pend[I(n, 0)] > 0 || pend[I(n, 1)] > 0 || pend[I(n, 2)] > 0) \
                           && !(hq[n] == REQ && psnap[I(n, 0)] == (pend[I(n, 0)] > 0) && psnap[I(n, 1)] == (pend[I(n, 1)] > 0) && psnap[I(n, 2)] == (pend[I(n, 2)] > 0)))
#define SNAPSHOT(n) psnap[I(n, 0)] = (pend[I(n, 0)] > 0); psnap[I(n, 1)] = (pend[I(n, 1)] > 0); psnap[I(n, 2)] = (pend[I(n, 2)] > 0)
#endif
#define NODE_HREQ(n) \
  :: d_step { WANTS_HANDOVER(n) -> hq[n] = REQ; SNAPSHOT(n) }

/* the holder answers only once the address is off its interface (rpc_handover waits) */
#ifdef NO_FENCE
#define HOLDER_FENCE(h) skip
#else
#define HOLDER_FENCE(h) fence(h)
#endif
#define HOLDER_ANSWERS(n) \
  :: d_step { hq[n] == REQ && nalive[OTHER(n)] && !plumbed[OTHER(n)] -> hq[n] = H_YES; HOLDER_FENCE(OTHER(n)) }

#ifdef EPOCH_CONFIRM
#define CONFIRM(n) if :: hvalid[n] -> conf[n] = 1 :: else fi
#else
#define CONFIRM1(n, v) if :: psnap[I(n, v)] && pend[I(n, v)] > 0 -> cnt[I(n, v)] = pend[I(n, v)]; csucc[I(n, v)] = 1; pend[I(n, v)] = 0; psnap[I(n, v)] = 0 :: else fi
#define CONFIRM(n) CONFIRM1(n, 0); CONFIRM1(n, 1); CONFIRM1(n, 2)
#endif
#define NODE_HREP(n) \
  :: d_step { hq[n] == H_YES -> \
       if :: MINE(n) -> CONFIRM(n) :: else fi; \
       hq[n] = IDLE }

/* ---- node n: ARP probe, plumb, expiry ---- */
/* The ARP probe and the plumb are one step here, and the probe is answered only by the
   address of a node whose service is dead (what it is for). A live holder is never seen
   by it: the model gives the probe no credit for the lease rule's job (conservative). */
#define NODE_PLUMB(n) \
  :: d_step { MINE(n) && !plumbed[n] && QUORUM(n) && (NO_PROBE(n) || nalive[OTHER(n)] || !plumbed[OTHER(n)]) -> \
       plumbed[n] = 1; \
       assert(!(plumbed[0] && plumbed[1])) }

#define NODE_LAPSE(n) \
  :: d_step { nalive[n] && plumbed[n] && !QUORUM(n) -> lapse(n) }

/* ---- assignments reach node n (late, possibly skipping some): _take_assignment ---- */
#ifdef NO_FENCE
#define STOP_WANTING(n) forget_promises(n)
#else
#define STOP_WANTING(n) fence(n)
#endif
#ifdef EPOCH_CONFIRM
#define NEW_EPOCH(n) conf[n] = 0; hvalid[n] = 0
#else
#define NEW_EPOCH(n) skip
#endif
#define NODE_VIEW(n) \
  :: atomic { nalive[n] && (nview[n] == NOVIEW || nview[n] < gseq) -> \
       bfr = MINE(n); \
       if \
       :: nview[n] == NOVIEW -> nview[n] = 0 \
       :: else -> nview[n]++ \
       fi; \
       do \
       :: nview[n] < gseq -> nview[n]++ \
       :: break \
       od; \
       if \
       :: !MINE(n) -> \
          if \
          :: plumbed[n] || bfr -> plumbed[n] = 0; release_all(n) \
          :: else \
          fi; \
          STOP_WANTING(n); NEW_EPOCH(n) \
       :: MINE(n) && !bfr -> NEW_EPOCH(n) \
       :: else \
       fi; \
       bfr = 0 }

/* assignments reach voter v late, possibly skipping some; only rpc_promise reads them,
   so the voter learns whatever it learns just before it answers a request */
#define LEARN_VIEW(v) \
       if \
       :: vview[v] == NOVIEW -> vview[v] = 0 \
       :: vview[v] == NOVIEW -> skip \
       :: else \
       fi; \
       do \
       :: vview[v] != NOVIEW && vview[v] < gseq -> vview[v]++ \
       :: break \
       od

/* ---- crashes ---- */
#define VOTER_CRASH(v) \
  :: d_step { vcrashes < VCRASH -> vcrashes++; \
       cur[v] = NOBODY; curt[v] = 0; suc[v] = NOBODY; suct[v] = 0; vwait[v] = PV; vview[v] = NOVIEW }

#define NODE_CRASH(n) \
  :: d_step { nalive[n] && ncrashes < NCRASH -> ncrashes++; \
       nalive[n] = 0; nview[n] = NOVIEW; conf[n] = 0; hvalid[n] = 0; \
       for (k : 0 .. NV - 1) { \
         cnt[I(n, k)] = 0; csucc[I(n, k)] = 0; pend[I(n, k)] = 0; psnap[I(n, k)] = 0; \
         if :: rq[I(n, k)] != IDLE -> rstale[I(n, k)] = 1 :: else fi \
       }; \
       k = 0; \
       if :: hq[n] == H_YES -> hq[n] = IDLE :: else fi }

/* the vip service starts again: handle_init removes the address it finds */
#define NODE_RESTART(n) \
  :: d_step { !nalive[n] -> nalive[n] = 1; plumbed[n] = 0 }

/* the kernel drops a dead node's address when its valid_lft runs out */
#define KERNEL_EXPIRY(n) \
  :: d_step { !nalive[n] && plumbed[n] -> plumbed[n] = 0 }

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
    DEC(pend[k]);
    if :: pend[k] == 0 -> psnap[k] = 0 :: else fi;
    if :: rq[k] != IDLE -> DEC(rrem[k]) :: else fi
  }
  k = 0
}

init {
  d_step {
    owner[0] = 0; gseq = 0;
    for (k : 0 .. NV - 1) { cur[k] = NOBODY; suc[k] = NOBODY; vview[k] = 0 }
    for (k : 0 .. NN - 1) { nalive[k] = 1; nview[k] = 0 }
    k = 0
  };
  do
  /* the coordinator changes its mind (move, failover, failback) */
  :: d_step { gseq < MAXSEQ -> gseq++; owner[gseq] = OTHER(owner[gseq - 1]) }
  /* time passes; a holder whose count ran out must have unplumbed (its timer's margin) */
  :: d_step { !HOLDER_LATE(0) && !HOLDER_LATE(1) -> tick() }

  NODE_REQ(0, 0) NODE_REQ(0, 1) NODE_REQ(0, 2) NODE_REQ(1, 0) NODE_REQ(1, 1) NODE_REQ(1, 2)
  VOTER_REQ(0, 0) VOTER_REQ(0, 1) VOTER_REQ(0, 2) VOTER_REQ(1, 0) VOTER_REQ(1, 1) VOTER_REQ(1, 2)
  NODE_REP(0, 0) NODE_REP(0, 1) NODE_REP(0, 2) NODE_REP(1, 0) NODE_REP(1, 1) NODE_REP(1, 2)
  VOTER_REL(0, 0) VOTER_REL(0, 1) VOTER_REL(0, 2) VOTER_REL(1, 0) VOTER_REL(1, 1) VOTER_REL(1, 2)
  REL_LOST(0, 0) REL_LOST(0, 1) REL_LOST(0, 2) REL_LOST(1, 0) REL_LOST(1, 1) REL_LOST(1, 2)
  NODE_HREQ(0) NODE_HREQ(1)
  HOLDER_ANSWERS(0) HOLDER_ANSWERS(1)
  NODE_HREP(0) NODE_HREP(1)
  NODE_PLUMB(0) NODE_PLUMB(1)
  NODE_LAPSE(0) NODE_LAPSE(1)
  NODE_VIEW(0) NODE_VIEW(1)
  VOTER_CRASH(0) VOTER_CRASH(1) VOTER_CRASH(2)
  NODE_CRASH(0) NODE_CRASH(1)
  NODE_RESTART(0) NODE_RESTART(1)
  KERNEL_EXPIRY(0) KERNEL_EXPIRY(1)
  od
}

#else
/* ======================================================================================
 * Part 2: configuration commits (-DCOMMITS)
 * ====================================================================================== */
#endif
