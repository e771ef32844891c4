/* Node forward counters: tc clsact programs on the node's uplinks.
 *
 * Attached on Ethernet devices, where the packet starts with the MAC header.
 * Both programs return TC_ACT_UNSPEC so that the next filter (the CNI's) runs.
 * With -DFOVEA_FLOWS they keep the flow table too (flows.inc).
 */
#include "fovea.h"
#ifdef FOVEA_FLOWS
#include "flows.inc"
#endif

BPF_PERCPU_ARRAY(forward_counts, struct fovea_counter, 2);

static __always_inline int count(struct __sk_buff *skb, u32 direction)
{
    struct fovea_packet pkt = {};
    if (!fovea_tc_parse(skb, &pkt))
        return TC_ACT_UNSPEC;
    fovea_add(forward_counts.lookup(&direction), &pkt);
#ifdef FOVEA_FLOWS
    fovea_flow(skb, &pkt, direction == FOVEA_INGRESS ? FLOW_UPLINK_IN : FLOW_UPLINK_OUT);
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
