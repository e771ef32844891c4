/* Node forward counters: tc clsact programs on the node's uplinks.
 *
 * Attached on Ethernet devices, where the packet starts with the MAC header.
 * Both programs return TC_ACT_UNSPEC so that the next filter (the CNI's) runs.
 * With -DFOVEA_FLOWS they keep the flow table too (flows.inc).
 * With -DFOVEA_DNS (the dns plugin), DNS of the node itself is counted here.
 */
#include "fovea.h"
#ifdef FOVEA_FLOWS
#define FOVEA_FLOW_NAT /* the uplink keeps masqueraded pod flows' replies off its table */
#include "flows.inc"
#endif

BPF_PERCPU_ARRAY(forward_counts, struct fovea_counter, 2);

#ifdef FOVEA_DNS
#define AF_INET 2
#define AF_INET6 10

/* DNS at an uplink is the node's own (host network): what a pod sent or is
 * sent is counted at the pod's interface. Leaving: count() passes only what
 * the node itself sent. Arriving: with flows on, a packet for a local pod (or
 * a masqueraded pod flow's reply) never gets here; for the rest, the kernel's
 * route lookup says whether it will be forwarded or delivered here (port 53
 * only: fovea_dns tests the ports first). */
static __always_inline int dns_counted_elsewhere(struct __sk_buff *skb, struct fovea_packet *pkt, int egress)
{
    if (egress)
        return 0;
    struct bpf_fib_lookup fib = {};
    fib.ifindex = skb->ingress_ifindex;
    fib.l4_protocol = pkt->l4proto;
    if (pkt->family == 4) {
        fib.family = AF_INET;
        __builtin_memcpy(&fib.ipv4_src, pkt->saddr, 4);
        __builtin_memcpy(&fib.ipv4_dst, pkt->daddr, 4);
    } else {
        fib.family = AF_INET6;
        __builtin_memcpy(fib.ipv6_src, pkt->saddr, 16);
        __builtin_memcpy(fib.ipv6_dst, pkt->daddr, 16);
    }
    int rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
    return rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH || rc == BPF_FIB_LKUP_RET_FRAG_NEEDED;
}
#include "dns.h"
#endif

static __always_inline int count(struct __sk_buff *skb, u32 direction)
{
    struct fovea_packet pkt = {};
    if (!fovea_tc_parse(skb, &pkt))
        return TC_ACT_UNSPEC;
    fovea_map_op();
    fovea_add(forward_counts.lookup(&direction), &pkt);
    /* Leaving, but it came in through another interface (a pod's veth, an
     * uplink): it was forwarded, and kept where it came in (its flow, its DNS).
     * Pod traffic costs the array add above and, with flows on, one lookup
     * telling whether it was source-NATed (flows.inc). */
    if (direction == FOVEA_EGRESS && skb->ingress_ifindex) {
#ifdef FOVEA_FLOWS
        fovea_flow_forwarded(skb, &pkt);
#endif
        return TC_ACT_UNSPEC;
    }
#ifdef FOVEA_FLOWS
    /* Arriving for a local pod: its interface keeps the flow and the DNS. */
    if (fovea_flow(skb, &pkt, direction == FOVEA_INGRESS ? FLOW_UPLINK_IN : FLOW_UPLINK_OUT))
        return TC_ACT_UNSPEC;
#endif
#ifdef FOVEA_DNS
    fovea_dns(skb, &pkt, direction == FOVEA_EGRESS);
#endif
    return TC_ACT_UNSPEC;
}

int forward_ingress(struct __sk_buff *skb)
{
    return count(skb, FOVEA_INGRESS);
}

int forward_egress(struct __sk_buff *skb)
{
    return count(skb, FOVEA_EGRESS);
}
