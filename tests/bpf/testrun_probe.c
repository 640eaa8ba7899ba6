/* Tiny XDP programs for the BPF_PROG_TEST_RUN wrapper's own tests. */
#include <uapi/linux/bpf.h>
int swap_macs(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    unsigned char *p = data;
    if (data + 14 > data_end)
        return XDP_DROP;
    for (int i = 0; i < 6; i++) {
        unsigned char t = p[i];
        p[i] = p[i + 6];
        p[i + 6] = t;
    }
    return XDP_TX;
}
int push4(struct xdp_md *ctx) {
    if (bpf_xdp_adjust_head(ctx, -4))
        return XDP_ABORTED;
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    if (data + 4 > data_end)
        return XDP_ABORTED;
    __builtin_memcpy(data, "\xde\xad\xbe\xef", 4);
    return XDP_PASS;
}
