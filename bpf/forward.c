/* Node forward counters: tc clsact programs on the node's uplinks.
 *
 * Attached on Ethernet devices, where the packet starts with the MAC header.
 * Both programs return TC_ACT_UNSPEC so that the next filter (the CNI's) runs.
 */
#include "fovea.h"

BPF_PERCPU_ARRAY(forward_counts, struct fovea_counter, 2);

static __always_inline int count(struct __sk_buff *skb, u32 direction)
{
    struct fovea_packet pkt = {};
    if (fovea_tc_parse(skb, &pkt))
        fovea_add(forward_counts.lookup(&direction), &pkt);
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
