/* Pod traffic: tc programs on the host side of each pod interface.
 *
 * On the host side of a pod's veth, tc ingress sees what the pod sends and
 * tc egress what it receives. Counters are keyed by interface index; user
 * space maps each interface to its pod and retires the keys when the
 * interface goes away, so a reused index never mixes two pods.
 * The flow table (source, destination, L4 protocol) feeds the workload
 * traffic map; `from_pod` says at which end the node saw the packet.
 *
 * Set from user space (-D): POD_MAP_SIZE, FLOW_MAP_SIZE; FOVEA_DNS and the
 * settings of dns.h when the dns plugin runs.
 * FOVEA_FLOWS (and flows.inc's sizes) to keep the flow table too.
 */
#include "fovea.h"
#ifdef FOVEA_FLOWS
#include "flows.inc"
#endif

#define FROM_POD 0 /* pod egress */
#define TO_POD 1   /* pod ingress */

struct pod_key {
    u32 ifindex;
    u32 direction;
};

struct flow_key {
    u8 family;
    u8 l4proto;
    u8 to_pod; /* 0: the pod sent it; 1: it was sent to the pod */
    u8 pad;
    u8 saddr[16];
    u8 daddr[16];
};

BPF_PERCPU_HASH(pod_counts, struct pod_key, struct fovea_counter, POD_MAP_SIZE);
BPF_PERCPU_HASH(flow_counts, struct flow_key, struct fovea_counter, FLOW_MAP_SIZE);
/* What found a table full: counted, never silently lost. */
#define OVERFLOW_FLOWS 0
#define OVERFLOW_PODS 1
BPF_PERCPU_ARRAY(overflow, struct fovea_counter, 2);

#ifdef FOVEA_DNS
/* Host-side pod interfaces (user space keeps it): a packet that came in
 * through one was counted at its sender's interface already. */
BPF_HASH(dns_pod_ifaces, u32, u8, POD_MAP_SIZE);

static __always_inline int dns_counted_elsewhere(struct __sk_buff *skb, struct fovea_packet *pkt, int from_pod)
{
    u32 in = skb->ingress_ifindex;
    return !from_pod && dns_pod_ifaces.lookup(&in) != NULL;
}
#include "dns.h"
#endif

static __always_inline void add_or_overflow(struct fovea_counter *c, int slot, struct fovea_packet *pkt)
{
    if (!c)
        c = overflow.lookup(&slot);
    fovea_add(c, pkt);
}

static __always_inline int count(struct __sk_buff *skb, u32 direction)
{
    struct fovea_packet pkt = {};
    if (!fovea_tc_parse(skb, &pkt))
        return TC_ACT_UNSPEC;

    struct fovea_counter zero = {};
    struct pod_key pk = {.ifindex = skb->ifindex, .direction = direction};
    add_or_overflow(pod_counts.lookup_or_try_init(&pk, &zero), OVERFLOW_PODS, &pkt);

    struct flow_key fk = {.family = pkt.family, .l4proto = pkt.l4proto, .to_pod = direction};
    __builtin_memcpy(fk.saddr, pkt.saddr, 16);
    __builtin_memcpy(fk.daddr, pkt.daddr, 16);
    add_or_overflow(flow_counts.lookup_or_try_init(&fk, &zero), OVERFLOW_FLOWS, &pkt);
#ifdef FOVEA_FLOWS
    fovea_flow(skb, &pkt, direction == FROM_POD ? FLOW_POD_SENT : FLOW_POD_RECEIVED);
#endif
#ifdef FOVEA_DNS
    fovea_dns(skb, &pkt, direction == FROM_POD);
#endif
    return TC_ACT_UNSPEC;
}

int pod_from_pod(struct __sk_buff *skb)
{
    return count(skb, FROM_POD);
}

int pod_to_pod(struct __sk_buff *skb)
{
    return count(skb, TO_POD);
}
