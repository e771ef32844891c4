/* Node forward counters: tc clsact programs on the node's uplinks.
 *
 * Attached on Ethernet devices, where the packet starts with the MAC header.
 * Both programs return TC_ACT_UNSPEC so that the next filter (the CNI's) runs.
 */
#include "fovea.h"

BPF_PERCPU_ARRAY(forward_counts, struct fovea_counter, 2);

static __always_inline int count(struct __sk_buff *skb, u32 direction)
{
    u64 packets, bytes;
    fovea_tc_measure(skb, &packets, &bytes);
    if (!packets)
        return TC_ACT_UNSPEC;
    struct fovea_counter *c = forward_counts.lookup(&direction);
    if (c) {
        c->packets += packets;
        c->bytes += bytes;
    }
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
