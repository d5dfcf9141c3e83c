/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Minimal, pinned declarations for splice.c. Hand-written so the build does
 * not depend on whichever kernel or libbpf headers the build host has:
 * fixed-width types, the map-definition and section macros of libbpf's
 * bpf_helpers.h, the handful of helper prototypes splice.c calls (helper
 * numbers are UAPI and never change), and just enough of the context and
 * kernel structs. Kernel structs are declared with preserve_access_index so
 * that field offsets are CO-RE relocated against the running kernel's BTF
 * at load time; only the fields we read are listed.
 */
#ifndef PGMFA_BPF_H
#define PGMFA_BPF_H

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed int __s32;
typedef signed long long __s64;

/* From libbpf's bpf_helpers.h. */
#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name
#define __always_inline inline __attribute__((always_inline))

/* UAPI constants (include/uapi/linux/bpf.h). */
enum { SK_DROP = 0, SK_PASS = 1 };
enum {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_SOCKHASH = 18,
	BPF_MAP_TYPE_RINGBUF = 27,
};
enum { BPF_F_NO_PREALLOC = 1 };
enum { BPF_RB_FORCE_WAKEUP = 2 };

/* The sk_skb context; len is the first field of struct __sk_buff. */
struct __sk_buff {
	__u32 len;
};

/* Kernel-internal; CO-RE relocated. */
struct tcp_sock {
	__u32 snd_una;
	__u32 write_seq;
} __attribute__((preserve_access_index));

/*
 * A unix socket's psock, reached through sk_user_data (whose low bits are
 * flags: SK_USER_DATA_NOCOPY|BPF|PSOCK). Only the redirect queue's length
 * is read, with bpf_probe_read_kernel.
 */
struct sock {
	void *sk_user_data;
} __attribute__((preserve_access_index));
struct unix_sock {
	struct sock sk;
} __attribute__((preserve_access_index));
struct sk_buff_head {
	__u32 qlen;
} __attribute__((preserve_access_index));
struct sk_psock {
	struct sk_buff_head ingress_skb;
} __attribute__((preserve_access_index));
#define SK_USER_DATA_PTRMASK (~7UL)

/*
 * The kernel's sk_buff behind the sk_skb context (bpf_cast_to_kern_ctx),
 * for the TCP control block in cb: seq is its first field
 * (include/net/tcp.h struct tcp_skb_cb).
 */
struct sk_buff {
	char cb[48];
} __attribute__((preserve_access_index));
extern void *bpf_cast_to_kern_ctx(void *ctx) __attribute__((section(".ksyms")));

/* The sockmap iterator's context. */
struct bpf_iter_meta {
	void *seq;
} __attribute__((preserve_access_index));
struct bpf_iter__sockmap {
	struct bpf_iter_meta *meta;
	void *key;
	struct sock *sk;
} __attribute__((preserve_access_index));

/* UAPI: a spin lock in a map value (the map needs BTF, which bpf2go keeps). */
struct bpf_spin_lock {
	__u32 val;
};

/* Helper prototypes (numbers from include/uapi/linux/bpf.h). */
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static __u64 (*bpf_get_socket_cookie)(void *ctx) = (void *)46;
static long (*bpf_sk_redirect_hash)(struct __sk_buff *skb, void *map, void *key, __u64 flags) = (void *)72;
static long (*bpf_sk_release)(void *sock) = (void *)86;
static long (*bpf_ringbuf_output)(void *ringbuf, void *data, __u64 size, __u64 flags) = (void *)130;
static struct tcp_sock *(*bpf_skc_to_tcp_sock)(void *sk) = (void *)137;
static long (*bpf_probe_read_kernel)(void *dst, __u32 size, const void *unsafe_ptr) = (void *)113;
static long (*bpf_seq_write)(void *seq, const void *data, __u32 len) = (void *)127;
static struct unix_sock *(*bpf_skc_to_unix_sock)(void *sk) = (void *)178;
static long (*bpf_skb_adjust_room)(struct __sk_buff *skb, __s32 len_diff, __u32 mode, __u64 flags) = (void *)50;
static long (*bpf_spin_lock)(struct bpf_spin_lock *lock) = (void *)93;
static long (*bpf_spin_unlock)(struct bpf_spin_lock *lock) = (void *)94;

#endif
