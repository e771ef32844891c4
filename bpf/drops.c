/* Drops: skb:kfree_skb fires for every freed skb that was dropped (normal
 * frees go to consume_skb). Aggregated in the kernel by reason, L4 protocol
 * and addresses; when that map is full, the drop still counts, by reason and
 * protocol, in a fixed array, so node totals stay right.
 *
 * Set from user space (-D):
 *   TP_KFREE_SKB_{SKBADDR,PROTOCOL,REASON}_OFF  field offsets from tracefs
 *   SKB_{HEAD,DATA,LEN,NETWORK_HEADER,END}_OFF    struct sk_buff, from BTF
 *   SHINFO_GSO_{SEGS}_OFF                         struct skb_shared_info, from BTF
 *   DROP_MAP_SIZE, DROP_REASON_MAX
 *   DROP_EVENTS_PER_SEC  drop events with ports (spans, the flow stream), per
 *                        CPU and second; past it they are counted, not sent,
 *                        except the first DROP_EVENTS_PER_FLOW of each flow
 *                        bucket: a flood on one flow never hides another's drops
 */
#include "fovea.h"

#define PROTO_CLASSES 4 /* tcp, udp, icmp, other */

struct drop_key {
    u32 reason;
    u8 family; /* 4, 6, or 0 when the network header was not set */
    u8 l4proto;
    u16 pad;
    u8 saddr[16];
    u8 daddr[16];
};

/* Every map is kept across a restart (lifecycle.keepAttached, bpf/fovea.h): an
 * unchanged program stays attached, and it uses them all. */
FOVEA_COUNTING_TABLE("percpu_hash", struct drop_key, struct fovea_counter, drop_counts, DROP_MAP_SIZE);
FOVEA_COUNTING_TABLE("percpu_array", int, struct fovea_counter, drop_overflow, DROP_REASON_MAX * PROTO_CLASSES);

/* One drop in detail, with ports: for span events and `fovea observe`. */
struct drop_event {
    struct drop_key key;
    u64 packets;
    u64 bytes;
    u64 time_ns; /* bpf_ktime_get_ns */
    u16 sport;  /* host order */
    u16 dport;
    u32 pad;
};

struct event_budget {
    u64 second; /* the second this budget is for */
    u64 sent;
    u64 skipped; /* over the rate: counted, not sent */
    u64 lost;    /* ring buffer full */
};

#define FLOW_BUCKETS 1024
#define DROP_EVENTS_PER_FLOW 4

#if DROP_EVENTS_PER_SEC > 0
FOVEA_RINGBUF(drop_events, 128);
FOVEA_COUNTING_TABLE("percpu_array", int, struct event_budget, drop_event_budget, 1); /* the whole CPU */
FOVEA_COUNTING_TABLE("percpu_array", int, struct event_budget, drop_flow_budget, FLOW_BUCKETS); /* per 5-tuple hash */

static __always_inline int take(struct event_budget *b, u64 second, u64 limit)
{
    if (b->second != second) {
        b->second = second;
        b->sent = 0;
    }
    if (b->sent >= limit)
        return 0;
    b->sent += 1;
    return 1;
}
#endif

#define FOVEA_READ(dst, base, off) bpf_probe_read_kernel(&(dst), sizeof(dst), (void *)(base) + (off))

static __always_inline u32 proto_class(u8 p)
{
    if (p == IPPROTO_TCP)
        return 0;
    if (p == IPPROTO_UDP)
        return 1;
    if (p == IPPROTO_ICMP || p == IPPROTO_ICMPV6)
        return 2;
    return 3;
}

int on_kfree_skb(void *ctx)
{
    u16 protocol = *(u16 *)(ctx + TP_KFREE_SKB_PROTOCOL_OFF); /* host order */
    if (protocol != ETH_P_IP && protocol != ETH_P_IPV6)
        return 0;

    struct drop_key key = {};
    key.reason = *(u32 *)(ctx + TP_KFREE_SKB_REASON_OFF);
    void *skb = *(void **)(ctx + TP_KFREE_SKB_SKBADDR_OFF);

    unsigned char *head = 0, *data = 0;
    u32 len = 0, end = 0;
    u16 nh = 0;
    FOVEA_READ(head, skb, SKB_HEAD_OFF);
    FOVEA_READ(data, skb, SKB_DATA_OFF);
    FOVEA_READ(len, skb, SKB_LEN_OFF);
    FOVEA_READ(nh, skb, SKB_NETWORK_HEADER_OFF);
    FOVEA_READ(end, skb, SKB_END_OFF);

    u16 segs = 0;
    FOVEA_READ(segs, head + end, SHINFO_GSO_SEGS_OFF);
    u64 packets = segs > 1 ? segs : 1;
    u64 bytes = len;
    u32 hdrs = 0;

    u16 sport = 0, dport = 0;
    if (nh != (u16)~0U) {
        unsigned char *ip = head + nh;
        u8 doff = 0;
        /* IP bytes run from the network header to the end of the data. */
        bytes = (u64)(data + len - ip);
        if (protocol == ETH_P_IP) {
            struct iphdr iph = {};
            FOVEA_READ(iph, ip, 0);
            key.family = 4;
            key.l4proto = iph.protocol;
            __builtin_memcpy(key.saddr, &iph.saddr, 4);
            __builtin_memcpy(key.daddr, &iph.daddr, 4);
            hdrs = iph.ihl * 4;
        } else {
            struct ipv6hdr ip6 = {};
            FOVEA_READ(ip6, ip, 0);
            key.family = 6;
            key.l4proto = ip6.nexthdr;
            __builtin_memcpy(key.saddr, &ip6.saddr, 16);
            __builtin_memcpy(key.daddr, &ip6.daddr, 16);
            hdrs = sizeof(ip6);
        }
        if (key.l4proto == IPPROTO_TCP)
            FOVEA_READ(doff, ip, hdrs + 12);
        if (key.l4proto == IPPROTO_TCP || key.l4proto == IPPROTO_UDP) {
            u16 ports[2] = {};
            FOVEA_READ(ports, ip, hdrs);
            sport = bpf_ntohs(ports[0]);
            dport = bpf_ntohs(ports[1]);
        }
        hdrs += fovea_l4_header_len(key.l4proto, doff);
    }
    bytes += (packets - 1) * hdrs;

    struct fovea_counter *c = drop_counts.lookup(&key);
    if (!c) {
        struct fovea_counter zero = {};
        drop_counts.insert(&key, &zero); /* fails when the map is full */
        c = drop_counts.lookup(&key);
    }
    if (!c) {
        u32 reason = key.reason < DROP_REASON_MAX ? key.reason : DROP_REASON_MAX - 1;
        u32 slot = reason * PROTO_CLASSES + proto_class(key.l4proto);
        c = drop_overflow.lookup(&slot);
    }
    if (c) {
        c->packets += packets;
        c->bytes += bytes;
    }
#if DROP_EVENTS_PER_SEC > 0
    int zero = 0;
    struct event_budget *budget = drop_event_budget.lookup(&zero);
    u32 a = 0, b = 0;
    __builtin_memcpy(&a, key.saddr, 4);
    __builtin_memcpy(&b, key.daddr, 4);
    u32 bucket = (a ^ b ^ ((u32)sport << 16 | dport) ^ key.l4proto) % FLOW_BUCKETS;
    struct event_budget *flow_budget = drop_flow_budget.lookup(&bucket);
    if (!budget || !flow_budget)
        return 0;
    u64 now = bpf_ktime_get_ns();
    u64 second = now / 1000000000ULL;
    int own = take(flow_budget, second, DROP_EVENTS_PER_FLOW);
    if (!take(budget, second, DROP_EVENTS_PER_SEC) && !own) {
        budget->skipped += 1;
        return 0;
    }
    struct drop_event *e = drop_events.ringbuf_reserve(sizeof(struct drop_event));
    if (!e) {
        budget->lost += 1;
        return 0;
    }
    __builtin_memcpy(&e->key, &key, sizeof(key));
    e->packets = packets;
    e->bytes = bytes;
    e->time_ns = now;
    e->sport = sport;
    e->dport = dport;
    e->pad = 0;
    drop_events.ringbuf_submit(e, 0);
#endif
    return 0;
}
