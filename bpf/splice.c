//go:build ignore

// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Stream verdict for spliced pgmfa sessions, with flow control.
 *
 * Every byte a spliced socket receives runs through pgmfa_verdict, which
 * redirects it to the egress (send side) of the session's other socket. The
 * kernel queues redirected skbs on the destination's psock and a kworker
 * pushes them into the destination's send queue; that queue (psock
 * ingress_skb) is charged to no socket buffer, and TCP acknowledges the
 * bytes as soon as they are redirected, so redirecting alone has no flow
 * control: a reader slower than its sender lets the queue grow without
 * bound (measured: 1 GiB absorbed, invisible in TCP's memory accounting).
 *
 * Flow control, per direction (struct dir, the state word of the direction):
 *  - REDIRECT (normal): the program measures the redirect queue exactly on
 *    every skb (backlog()). Past pause_at it switches the direction to PASS
 *    itself, starting with the skb at hand, and tells the watcher.
 *  - PASS: the bytes stay in the source socket (SK_PASS: charged to its
 *    receive buffer, so TCP's window closes and the sender slows to the
 *    pace at which they are read). The watcher reads them (recvmsg only) and
 *    writes them to the destination itself, but only once every byte
 *    redirected before the switch is in the destination's send path; it
 *    publishes what it read and wrote in the relayed map.
 *  - Back to REDIRECT: the program, never user space, switches back, at the
 *    first skb that finds passed == written: every passed byte is already in
 *    the destination's send path, so that skb cannot overtake one, and user
 *    space holds nothing it has not written.
 * The ordering argument, and the kernel behaviour it rests on, is in
 * doc.go. The one bound that ends a session (DIR_OVER, at limit) is a
 * safety net for a peer that defeats the mechanism (see pgmfa_verdict).
 */
#include "include/pgmfa_bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* dir.flags */
#define DIR_BASE_SET 1 /* base_seq holds the peer's write_seq at the first verdict */
#define DIR_OVER 2     /* the hard bound was reached: the session is being ended */
#define DIR_PASS 4     /* flow control: bytes stay in the source for user space */
#define DIR_TCP_SRC 8  /* set by user space: the source is TCP, skbs carry sequence numbers */
#define DIR_SEQ_SET 16 /* next_seq holds the sequence number the next skb should start at */

/*
 * One direction of a session, keyed by the cookie of the socket the bytes
 * arrive on. User space creates the entry (peer, pause_at, limit; the rest
 * zero) and never writes it again: the program owns the other fields, so a
 * user-space update would clobber them. What user space owns is in
 * struct relayed.
 */
struct dir {
	__u64 peer;          /* cookie of the socket these bytes go to */
	__u64 pause_at;      /* redirect backlog that starts flow control; 0: never */
	__u64 limit;         /* hard bound on bytes held outside both sockets */
	__u64 redirected;    /* bytes handed to the peer's redirect queue */
	__u64 passed;        /* bytes left in the source socket for user space */
	__u64 episodes;      /* times the direction switched to PASS */
	__u64 over_backlog;  /* what was held when the hard bound was reached */
	__u64 overlaps;      /* skbs that started before next_seq (trim_seen) */
	__u64 overlap_bytes; /* bytes of them seen before, dropped or trimmed */
	__u64 gaps;          /* skbs that started after next_seq (never seen) */
	__u32 base_seq;      /* the peer's write_seq when this direction first ran */
	__u32 flags;         /* DIR_* */
	__u32 next_seq;      /* TCP sources: end of the bytes seen so far */
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 131072);
	__type(key, __u64);
	__type(value, struct dir);
} dirs SEC(".maps");

/*
 * What user space moved of a direction's passed bytes, keyed like dirs and
 * written only by user space: read from the source, and written to the
 * destination (published after the write returned, so every byte counted
 * here is in the destination's send path). Missing means zero.
 *
 * User space creates the entry with the session and then only updates it
 * in place, under the lock (BPF_F_LOCK), and the program reads it under
 * the lock. Both matter: a plain update of a hash map replaces the element
 * and frees the old one, which the next update of another key may reuse at
 * once (kernel/bpf/hashtab.c free_htab_elem: pcpu_freelist_push, or
 * bpf_mem_cache_free onto the CPU's free list), so a verdict holding the
 * old pointer would read another session's counts; and an in-place copy
 * (rep movsb on this CPU) could be read torn.
 */
struct relayed {
	struct bpf_spin_lock lock;
	__u32 pad;
	__u64 read;
	__u64 written;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 131072);
	__type(key, __u64);
	__type(value, struct relayed);
} relayed SEC(".maps");

/*
 * Redirect targets, keyed by socket cookie. No program is attached to this
 * map: being in it only gives a socket the psock that a redirect needs.
 */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 131072);
	__type(key, __u64);
	__type(value, __u64);
} targets SEC(".maps");

/*
 * The sockets whose received bytes run through pgmfa_verdict (the program
 * is attached to this map). Kept apart from targets so that a socket can be
 * a redirect target before its own bytes start to move.
 */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 131072);
	__type(key, __u64);
	__type(value, __u64);
} verdict_socks SEC(".maps");

/*
 * Cookies of directions that need the watcher: a switch to PASS, or the
 * hard bound.
 */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

/*
 * Notifications the ring buffer had no room for (the watcher fell 16,384
 * records behind). Without its notification a direction switched to PASS
 * would wait unseen, so the watcher checks this counter every second and,
 * when it moved, looks at every session.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} lost SEC(".maps");

/*
 * psock_qlen returns how many skbs wait in sk's redirect queue (its psock's
 * ingress_skb, which the kworker sends from), or -1 when sk has no psock.
 * The kworker peeks the head skb and unlinks it only once it is wholly
 * sent (sk_psock_backlog), so 0 means every byte queued there has left.
 */
static __always_inline __s64 psock_qlen(struct sock *sk)
{
	struct sk_psock *ps;
	__u32 q = 0;

	ps = (struct sk_psock *)((unsigned long)sk->sk_user_data & SK_USER_DATA_PTRMASK);
	if (!ps)
		return -1;
	if (bpf_probe_read_kernel(&q, sizeof(q), &ps->ingress_skb.qlen))
		return -1;
	return q;
}

/*
 * A unix socket has no write_seq, so towards one the backlog is estimated
 * from the number of skbs queued, each counted as a full loopback TCP
 * segment (GSO skbs carry up to 64 KiB): an upper bound, so flow control
 * starts no later than the TCP measure would, and earlier when the client
 * sends many small messages while the database is not reading.
 */
#define UNIX_SKB_BYTES 65536

/*
 * backlog returns the bytes redirected to the peer that have not yet
 * entered the peer's send queue: the uncharged psock queue. write_seq only
 * moves when bytes enter the send queue, and only two writers touch a
 * spliced socket's send side: the kworker (redirected bytes) and the
 * watcher (written, the passed bytes it relayed), so
 *   backlog = redirected + written - (write_seq - base_seq).
 * base_seq is taken at the first verdict of the direction, before anything
 * was redirected (the read-ahead written by Splice precedes it). Sequence
 * numbers wrap, so the difference is taken in 32 bits. written is
 * published after the write, so while the watcher relays the result can
 * be low by what it has written and not yet published; that only matters
 * in PASS, where the backlog is not consulted. The peer's send queue
 * itself is not counted: it is charged to the peer and bounded by its
 * SO_SNDBUF. Returns -1 when the peer is gone.
 */
static __always_inline __s64 backlog(struct dir *d, __u64 written)
{
	struct tcp_sock *tp;
	struct unix_sock *u;
	void *peer;
	__s64 b = -1;
	__u32 wseq;

	/* A referenced socket: must be released on every path. */
	peer = bpf_map_lookup_elem(&targets, &d->peer);
	if (!peer)
		return -1;
	tp = bpf_skc_to_tcp_sock(peer);
	if (tp) {
		wseq = tp->write_seq;
		if (!(d->flags & DIR_BASE_SET)) {
			d->base_seq = wseq;
			d->flags |= DIR_BASE_SET;
		}
		b = (__s32)((__u32)d->redirected + (__u32)written + d->base_seq - wseq);
		if (b < 0)
			b = 0;
	} else if ((u = bpf_skc_to_unix_sock(peer))) {
		b = psock_qlen(&u->sk);
		if (b > 0)
			b *= UNIX_SKB_BYTES;
	}
	bpf_sk_release(peer);
	return b;
}

static __always_inline void notify(__u64 *cookie)
{
	__u32 zero = 0;
	__u64 *n;

	if (bpf_ringbuf_output(&events, cookie, sizeof(*cookie), BPF_RB_FORCE_WAKEUP)) {
		n = bpf_map_lookup_elem(&lost, &zero);
		if (n)
			__sync_fetch_and_add(n, 1);
	}
}

/* over marks the direction at the hard bound and tells the watcher. */
static __always_inline int over(struct dir *d, __u64 *cookie, __u64 held)
{
	d->flags |= DIR_OVER;
	d->over_backlog = held;
	notify(cookie);
	return SK_PASS;
}

/*
 * The verdict can be handed bytes it has already seen: tcp_data_queue
 * queues a partly retransmitted segment (seq < rcv_nxt < end_seq) whole,
 * leaving readers to skip the old head by copied_seq, and tcp_read_skb,
 * which feeds the verdict, hands over whole skbs and skips nothing
 * (net/ipv4/tcp_input.c "Partial packet", net/ipv4/tcp.c tcp_read_skb, in
 * 6.12 and this 6.18). Retransmissions are rare on loopback until flow
 * control charges passed bytes to a receive buffer that TCP cannot
 * collapse: the stress tests then saw 1 session in ~200 get 5-65 KB twice
 * (nstat: TCPRcvQDrop and TCPDSACKOldSent in the tens of thousands).
 * So the program follows each TCP direction's sequence numbers and
 * removes what it has seen: an skb wholly seen is dropped (TCP has
 * already acknowledged it and its bytes went on once), a partly seen one
 * is trimmed at the head. Returns the skb's length to account, or
 * TRIM_DROP / TRIM_FAIL.
 */
#define TRIM_DROP -1
#define TRIM_FAIL -2
#define ADJUST_MAX 0xfff /* sk_skb_adjust_room takes at most this much per call */
/*
 * Calls per skb: up to 256 * 4095 = 1,048,320 bytes trimmed. 17 calls
 * (69,615 bytes) fell short once in CI: an overlap larger than that ended
 * a healthy session of TestTransferExact (the trim could not finish, so
 * the session could not be delivered once: TRIM_FAIL).
 */
#define ADJUST_CALLS 256

static __always_inline __s64 trim_seen(struct dir *d, struct __sk_buff *ctx, __u32 len)
{
	struct sk_buff *skb = bpf_cast_to_kern_ctx(ctx);
	__u32 seq = 0, cut;
	__s32 back;
	int i;

	if (bpf_probe_read_kernel(&seq, sizeof(seq), &skb->cb[0]))
		return TRIM_FAIL;
	if (!(d->flags & DIR_SEQ_SET)) {
		d->next_seq = seq + len;
		d->flags |= DIR_SEQ_SET;
		return len;
	}
	back = (__s32)(d->next_seq - seq);
	if (back < 0) {
		/* Cannot happen (TCP queues in order); counted, not fixed. */
		d->gaps++;
		d->next_seq = seq + len;
		return len;
	}
	if (back == 0) {
		d->next_seq = seq + len;
		return len;
	}
	d->overlaps++;
	if ((__u32)back >= len) {
		d->overlap_bytes += len;
		return TRIM_DROP;
	}
	cut = back;
	for (i = 0; i < ADJUST_CALLS && cut; i++) {
		__u32 n = cut < ADJUST_MAX ? cut : ADJUST_MAX;

		if (bpf_skb_adjust_room(ctx, -(__s32)n, 0, 0))
			return TRIM_FAIL;
		cut -= n;
		d->overlap_bytes += n;
	}
	if (cut)
		return TRIM_FAIL;
	d->next_seq = seq + len;
	return ctx->len;
}

SEC("sk_skb/stream_verdict")
int pgmfa_verdict(struct __sk_buff *skb)
{
	__u32 len = skb->len;
	struct relayed *r = 0;
	__u64 cookie, rd = 0, wr = 0;
	struct dir *d;
	__s64 b;

	/*
	 * The FIN arrives as an skb without payload; TCP has already recorded
	 * the FIN in the socket state (RCV_SHUTDOWN, which the watcher sees as
	 * EPOLLRDHUP) before the verdict runs. The empty skb itself must not
	 * go anywhere, measured on 6.18:
	 *  - redirected, it reaches the peer's psock queue and the kworker's
	 *    send of zero bytes returns 0, which sk_psock_backlog treats as a
	 *    hard error: EPIPE on the peer and its transmit side disabled;
	 *  - passed (SK_PASS) while this socket's own psock queue holds bytes
	 *    redirected to it, it is queued behind them and hits the same
	 *    zero-length error on this socket (seen as "broken pipe" when both
	 *    sides close at once).
	 * Dropping it loses nothing: it carries no bytes, and the FIN is
	 * forwarded by the watcher as shutdown(SHUT_WR) once this direction's
	 * bytes are out. The only other SK_DROP is for bytes already seen
	 * (trim_seen).
	 */
	if (len == 0)
		return SK_DROP;

	cookie = bpf_get_socket_cookie(skb);
	d = bpf_map_lookup_elem(&dirs, &cookie);
	if (!d)
		return SK_PASS;

	/*
	 * Verdicts for one socket run one at a time (under the socket lock:
	 * from tcp_data_ready in softirq, or from the release_sock backlog of
	 * the process that owns the socket), so the plain updates of d below
	 * do not race with each other; user space only reads them.
	 */
	if (d->flags & DIR_OVER)
		return SK_PASS;
	if (d->flags & DIR_TCP_SRC) {
		__s64 l = trim_seen(d, skb, len);

		if (l == TRIM_DROP)
			return SK_DROP;
		if (l == TRIM_FAIL) /* cannot deliver it once: end the session */
			return over(d, &cookie, 0);
		len = l;
	}
	if (d->episodes) {
		r = bpf_map_lookup_elem(&relayed, &cookie);
		if (r) {
			bpf_spin_lock(&r->lock);
			rd = r->read;
			wr = r->written;
			bpf_spin_unlock(&r->lock);
		}
	}

	if (d->flags & DIR_PASS) {
		if (d->passed != wr) {
			/*
			 * Still relaying. Passed bytes that find this socket's
			 * psock queue non-empty (it also carries the other
			 * direction's bytes towards this socket) wait there,
			 * charged to nobody until the kworker moves them to
			 * the socket (sk_psock_verdict_apply, __SK_PASS), so a
			 * peer that sends while it does not read could grow it:
			 * passed - read counts them, with what sits readable.
			 */
			if (d->passed - rd > d->limit)
				return over(d, &cookie, d->passed - rd);
			d->passed += len;
			return SK_PASS;
		}
		/*
		 * Every passed byte has been written to the peer: redirecting
		 * this skb cannot overtake any of them. Back to REDIRECT,
		 * starting here; the backlog check below still applies.
		 */
		d->flags &= ~DIR_PASS;
		notify(&cookie); /* the watcher stops listening for passed bytes */
	}

	b = backlog(d, wr);
	if (b > 0 && d->pause_at && (__u64)b > d->pause_at) {
		/*
		 * Flow control: pass from this skb on. A verdict that read the
		 * old state cannot exist (they are serialized), so every byte
		 * redirected before is counted in redirected by now, before
		 * user space can read any passed byte.
		 */
		d->flags |= DIR_PASS;
		d->episodes++;
		d->passed += len;
		notify(&cookie);
		return SK_PASS;
	}
	/* Without flow control (pause_at 0) the hard bound ends the session. */
	if (b > 0 && (__u64)b > d->limit)
		return over(d, &cookie, b);

	/*
	 * For sk_skb programs bpf_sk_redirect_hash does not redirect by itself:
	 * it records the target in the skb and returns SK_PASS (SK_DROP when
	 * the key is missing). The kernel then maps our return value: SK_PASS
	 * with a recorded target becomes __SK_REDIRECT, SK_PASS without one
	 * __SK_PASS (sk_psock_map_verd). So returning SK_PASS unconditionally
	 * redirects when the helper succeeded and otherwise leaves the bytes
	 * readable in this socket, where nothing is lost; SK_DROP would throw
	 * away bytes TCP has already acknowledged.
	 */
	if (bpf_sk_redirect_hash(skb, &targets, &d->peer, 0) == SK_PASS)
		d->redirected += len;
	return SK_PASS;
}

/*
 * pgmfa_queues reports, for every socket in targets, its cookie and the
 * length of its redirect queue. The watcher runs it (a sockmap iterator)
 * before forwarding a FIN to a unix socket: a unix socket has no
 * write_seq to tell it that every redirected byte has left the queue.
 */
SEC("iter/sockmap")
int pgmfa_queues(struct bpf_iter__sockmap *ctx)
{
	struct sock *sk = ctx->sk;
	__u64 *key = ctx->key;
	struct {
		__u64 cookie;
		__s64 qlen;
	} rec;

	if (!sk || !key)
		return 0;
	rec.cookie = *key;
	rec.qlen = psock_qlen(sk);
	bpf_seq_write(ctx->meta->seq, &rec, sizeof(rec));
	return 0;
}
