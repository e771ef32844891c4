/* Pod traffic: tc programs on the host side of each pod interface.
 *
 * On the host side of a pod's veth, tc ingress sees what the pod sends and
 * tc egress what it receives. Every packet goes to the flow table
 * (flows.inc), keyed by 5-tuple, point and interface: one map operation for
 * a flow already seen. User space derives from it the per-pod counters (by
 * interface, which it maps to its pod) and the workload traffic map (by
 * addresses), and retires an interface's entries when it goes away, so a
 * reused index never mixes two pods.
 *
 * Set from user space (-D): flows.inc's sizes; POD_MAP_SIZE, FOVEA_DNS and
 * the settings of dns.h when the dns plugin runs; FOVEA_HTTP and the
 * settings of http.h when the http plugin runs.
 */
#include "fovea.h"
#include "flows.inc"

#define FROM_POD 0 /* pod egress */
#define TO_POD 1   /* pod ingress */

#ifdef FOVEA_DNS
/* Host-side pod interfaces (user space keeps it): a packet that came in
 * through one was counted at its sender's interface already. */
BPF_HASH(dns_pod_ifaces, u32, u8, POD_MAP_SIZE);

static __always_inline int dns_counted_elsewhere(struct __sk_buff *skb, struct fovea_packet *pkt, int from_pod)
{
    u32 in = skb->ingress_ifindex;
    if (from_pod)
        return 0;
    fovea_map_op();
    return dns_pod_ifaces.lookup(&in) != NULL;
}
#include "dns.h"
#endif

#ifdef FOVEA_HTTP
#include "http.h"
#endif

static __always_inline int count(struct __sk_buff *skb, u32 direction)
{
    struct fovea_packet pkt = {};
    if (!fovea_tc_parse(skb, &pkt))
        return TC_ACT_UNSPEC;
    fovea_flow(skb, &pkt, direction == FROM_POD ? FLOW_POD_SENT : FLOW_POD_RECEIVED);
#ifdef FOVEA_HTTP
    /* Port 53 is DNS's, every other HTTP's to look at: the verifier then walks
     * the two parsers side by side, not one after the other. */
    if (pkt.sport != 53 && pkt.dport != 53) {
        fovea_http(skb, &pkt, direction == TO_POD);
        return TC_ACT_UNSPEC;
    }
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
