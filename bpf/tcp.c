/* TCP health from tracepoints (no kprobes): retransmits, resets, state
 * transitions, handshake latency and smoothed RTT, each keyed by the socket's
 * network namespace so user space counts the namespaces it observes (the
 * host's and the pods') and nothing else on the machine.
 *
 * Set from user space (-D):
 *   TP_<EVENT>_<FIELD>_OFF      tracepoint field offsets from tracefs
 *   SKC_NET_OFF, NET_INUM_OFF   struct sock_common.skc_net, struct net.ns.inum (BTF)
 *   SKB_DEV_OFF, DEV_ND_NET_OFF struct sk_buff.dev, struct net_device.nd_net (BTF)
 *   SKB_CB_OFF, GSO_SEGS_OFF    struct sk_buff.cb, struct tcp_skb_cb.tcp_gso_segs (BTF)
 *   TCP_MAP_SIZE, SOCKET_MAP_SIZE, RTT_INTERVAL_NS
 */
#include "fovea.h"

#define FOVEA_READ(dst, base, off) bpf_probe_read_kernel(&(dst), sizeof(dst), (void *)(base) + (off))
#define TP(event, field, type) (*(type *)(ctx + TP_##event##_##field##_OFF))

#define AF_INET_ 2
#define AF_INET6_ 10
#define TCP_ESTABLISHED_ 1
#define TCP_SYN_SENT_ 2
#define TCP_SYN_RECV_ 3
#define TCP_CLOSE_ 7
#define TCP_LISTEN_ 10
#define STATES 13

/* Kinds of counted events, as in agent/plugins/tcp.py. */
#define EV_RETRANSMIT 0
#define EV_RESET_SENT 1
#define EV_RESET_RECEIVED 2

/* Histograms: bucket i holds samples <= 10us * 2^i; the last is +Inf. */
#define HIST_CONNECT 0
#define HIST_RTT 1
#define BUCKETS 22

/* Slots of tcp_lost: what could not be kept in detail. */
#define LOST_EVENTS 0   /* event map full: counted without namespace/address */
#define LOST_SOCKETS 1  /* socket map full: a handshake or RTT not measured */
#define LOST_HIST 2     /* histogram map full */
#define LOST_STATES 3   /* state map full */

struct event_key {
    u32 netns;
    u8 kind;
    u8 family; /* 4 or 6; 0 when unknown */
    u16 pad;
    u8 addr[16]; /* the local address of the socket */
};

struct hist_key {
    u32 netns;
    u8 hist;
    u8 bucket;
    u16 pad;
};

struct state_key {
    u32 netns;
    u32 state;
};

/* packets = events (or samples, or entries into the state); bytes = the
 * sum of samples in ns (histograms), or exits from the state. */
/* Every map is kept across a restart (lifecycle.keepAttached, bpf/fovea.h): an
 * unchanged program stays attached, and it uses them all. */
FOVEA_COUNTING_TABLE("percpu_hash", struct event_key, struct fovea_counter, tcp_events, TCP_MAP_SIZE);
FOVEA_COUNTING_TABLE("percpu_hash", struct hist_key, struct fovea_counter, tcp_hist, TCP_MAP_SIZE);
FOVEA_COUNTING_TABLE("percpu_hash", struct state_key, struct fovea_counter, tcp_states, TCP_MAP_SIZE);
FOVEA_COUNTING_TABLE("percpu_array", int, u64, tcp_lost, 4);
FOVEA_COUNTING_TABLE("percpu_array", int, u64, tcp_events_overflow, 3); /* per kind, when tcp_events is full */
FOVEA_COUNTING_TABLE("hash", u64, u64, connect_start, SOCKET_MAP_SIZE); /* socket -> SYN_SENT time */
FOVEA_COUNTING_TABLE("hash", u64, u64, rtt_last, SOCKET_MAP_SIZE);      /* socket -> last RTT sample time */

static __always_inline u32 netns_of_net(void *net)
{
    u32 inum = 0;
    if (net)
        FOVEA_READ(inum, net, NET_INUM_OFF);
    return inum;
}

static __always_inline u32 sk_netns(const void *sk)
{
    void *net = 0;
    if (!sk)
        return 0;
    FOVEA_READ(net, sk, SKC_NET_OFF);
    return netns_of_net(net);
}

static __always_inline u32 skb_netns(const void *skb)
{
    void *dev = 0, *net = 0;
    if (!skb)
        return 0;
    FOVEA_READ(dev, skb, SKB_DEV_OFF);
    if (!dev)
        return 0;
    FOVEA_READ(net, dev, DEV_ND_NET_OFF);
    return netns_of_net(net);
}

static __always_inline void lost(u32 slot)
{
    u64 *v = tcp_lost.lookup(&slot);
    if (v)
        (*v)++;
}

static __always_inline void count_events(struct event_key *key, u64 n)
{
    struct fovea_counter zero = {};
    struct fovea_counter *c = tcp_events.lookup_or_try_init(key, &zero);
    if (c) {
        c->packets += n;
        return;
    }
    u32 kind = key->kind;
    u64 *v = tcp_events_overflow.lookup(&kind);
    if (v)
        (*v) += n;
    lost(LOST_EVENTS);
}

static __always_inline void observe(u32 netns, u8 hist, u64 ns)
{
    u64 bound = 10000;
    u8 bucket = BUCKETS - 1;
#pragma unroll
    for (int i = 0; i < BUCKETS - 1; i++) {
        if (ns <= bound) {
            bucket = i;
            break;
        }
        bound <<= 1;
    }
    struct hist_key key = {.netns = netns, .hist = hist, .bucket = bucket};
    struct fovea_counter zero = {};
    struct fovea_counter *c = tcp_hist.lookup_or_try_init(&key, &zero);
    if (!c) {
        lost(LOST_HIST);
        return;
    }
    c->packets++;
    c->bytes += ns;
}

static __always_inline void set_local(struct event_key *key, u16 family, const u8 *v4, const u8 *v6)
{
    if (family == AF_INET_) {
        key->family = 4;
        __builtin_memcpy(key->addr, v4, 4);
    } else if (family == AF_INET6_) {
        key->family = 6;
        __builtin_memcpy(key->addr, v6, 16);
    }
}

/* A sockaddr_in / sockaddr_in6 as the newer tracepoints store addresses. */
static __always_inline void set_local_sockaddr(struct event_key *key, const u8 *sa)
{
    u16 family = *(u16 *)sa;
    if (family == AF_INET_) {
        key->family = 4;
        __builtin_memcpy(key->addr, sa + 4, 4);
    } else if (family == AF_INET6_) {
        key->family = 6;
        __builtin_memcpy(key->addr, sa + 8, 16);
    }
}

int on_retransmit_skb(void *ctx)
{
    if (TP(TCP_RETRANSMIT_SKB, ERR, int) != 0)
        return 0; /* the retransmit failed: nothing went on the wire */
    struct event_key key = {.kind = EV_RETRANSMIT};
    key.netns = sk_netns(TP(TCP_RETRANSMIT_SKB, SKADDR, void *));
    set_local(&key, TP(TCP_RETRANSMIT_SKB, FAMILY, u16), (u8 *)(ctx + TP_TCP_RETRANSMIT_SKB_SADDR_OFF),
              (u8 *)(ctx + TP_TCP_RETRANSMIT_SKB_SADDR_V6_OFF));
    /* Segments, as the kernel's RetransSegs counts them: an skb may carry several (GSO). */
    u16 segs = 0;
    FOVEA_READ(segs, TP(TCP_RETRANSMIT_SKB, SKBADDR, void *), SKB_CB_OFF + GSO_SEGS_OFF);
    count_events(&key, segs ? segs : 1);
    return 0;
}

int on_retransmit_synack(void *ctx)
{
    struct event_key key = {.kind = EV_RETRANSMIT};
    key.netns = sk_netns(TP(TCP_RETRANSMIT_SYNACK, SKADDR, void *));
    set_local(&key, TP(TCP_RETRANSMIT_SYNACK, FAMILY, u16), (u8 *)(ctx + TP_TCP_RETRANSMIT_SYNACK_SADDR_OFF),
              (u8 *)(ctx + TP_TCP_RETRANSMIT_SYNACK_SADDR_V6_OFF));
    count_events(&key, 1);
    return 0;
}

int on_send_reset(void *ctx)
{
    struct event_key key = {.kind = EV_RESET_SENT};
    void *sk = TP(TCP_SEND_RESET, SKADDR, void *);
    /* No socket (a segment for a closed port): the namespace of the device it came in on. */
    key.netns = sk ? sk_netns(sk) : skb_netns(TP(TCP_SEND_RESET, SKBADDR, void *));
    set_local_sockaddr(&key, (u8 *)(ctx + TP_TCP_SEND_RESET_SADDR_OFF));
    count_events(&key, 1);
    return 0;
}

int on_receive_reset(void *ctx)
{
    struct event_key key = {.kind = EV_RESET_RECEIVED};
    key.netns = sk_netns(TP(TCP_RECEIVE_RESET, SKADDR, void *));
    set_local(&key, TP(TCP_RECEIVE_RESET, FAMILY, u16), (u8 *)(ctx + TP_TCP_RECEIVE_RESET_SADDR_OFF),
              (u8 *)(ctx + TP_TCP_RECEIVE_RESET_SADDR_V6_OFF));
    count_events(&key, 1);
    return 0;
}

static __always_inline void state_count(u32 netns, u32 state, int entered)
{
    if (state >= STATES)
        return;
    struct state_key key = {.netns = netns, .state = state};
    struct fovea_counter zero = {};
    struct fovea_counter *c = tcp_states.lookup_or_try_init(&key, &zero);
    if (!c) {
        lost(LOST_STATES);
        return;
    }
    if (entered)
        c->packets++;
    else
        c->bytes++;
}

int on_set_state(void *ctx)
{
    if (TP(INET_SOCK_SET_STATE, PROTOCOL, u16) != IPPROTO_TCP)
        return 0;
    u64 sk = (u64)TP(INET_SOCK_SET_STATE, SKADDR, void *);
    int oldstate = TP(INET_SOCK_SET_STATE, OLDSTATE, int);
    int newstate = TP(INET_SOCK_SET_STATE, NEWSTATE, int);
    u32 netns = sk_netns((void *)sk);

    /* A child socket is cloned from its listener: it never was one, and the
     * listener stays where it is. */
    if (!(oldstate == TCP_LISTEN_ && newstate == TCP_SYN_RECV_))
        state_count(netns, oldstate, 0);
    state_count(netns, newstate, 1);

    u64 now = bpf_ktime_get_ns();
    if (newstate == TCP_SYN_SENT_) {
        if (connect_start.update(&sk, &now) != 0)
            lost(LOST_SOCKETS);
    } else if (oldstate == TCP_SYN_SENT_) {
        u64 *start = connect_start.lookup(&sk);
        if (start && newstate == TCP_ESTABLISHED_)
            observe(netns, HIST_CONNECT, now - *start);
        connect_start.delete(&sk);
    }
    if (newstate == TCP_CLOSE_)
        rtt_last.delete(&sk);
    return 0;
}

/* Fires for each segment an established socket receives; srtt is in us.
 * One sample per socket per interval. */
int on_probe(void *ctx)
{
    u64 sk = (u64)TP(TCP_PROBE, SKADDR, void *);
    u64 now = bpf_ktime_get_ns();
    u64 *last = rtt_last.lookup(&sk);
    if (last && now - *last < RTT_INTERVAL_NS)
        return 0;
    u32 srtt = TP(TCP_PROBE, SRTT, u32);
    if (srtt == 0)
        return 0; /* no estimate yet */
    if (rtt_last.update(&sk, &now) != 0) {
        lost(LOST_SOCKETS);
        return 0;
    }
    observe(sk_netns((void *)sk), HIST_RTT, (u64)srtt * 1000);
    return 0;
}
