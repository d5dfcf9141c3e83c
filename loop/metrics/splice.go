package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/pgmfa/pgmfa/bpf"
)

// spliceCollector reads the splicer's counters at scrape time: they are
// atomics the splicer keeps anyway, so the metrics cost the data path
// nothing. Each covers the spliced sessions that have ended.
type spliceCollector struct{ sp *bpf.Splicer }

var (
	descFlowEpisodes = prometheus.NewDesc("pgmfa_splice_flow_control_episodes_total",
		"Times a direction of a spliced session entered flow control (the kernel's queue reached --flow-threshold and the direction was moved in user space until its reader caught up), counted when the session ends.", nil, nil)
	descFlowBytes = prometheus.NewDesc("pgmfa_splice_flow_control_relayed_bytes_total",
		"Bytes of spliced sessions that flow control moved in user space, counted when the session ends.", nil, nil)
	descBacklogEnds = prometheus.NewDesc("pgmfa_splice_backlog_limit_ends_total",
		"Spliced sessions ended at the --max-backlog bound.", nil, nil)
	descAnomalies = prometheus.NewDesc("pgmfa_splice_anomalies_total",
		"Spliced sessions that ended with byte counts disagreeing with TCP's; 0 is the only healthy value.", nil, nil)
	descDupSkbs = prometheus.NewDesc("pgmfa_splice_kernel_duplicate_skbs_total",
		"Socket buffers the kernel handed the splice program again with bytes it had already seen (removed by the program), over ended sessions.", nil, nil)
	descDupBytes = prometheus.NewDesc("pgmfa_splice_kernel_duplicate_bytes_total",
		"Bytes the splice program removed from such duplicated socket buffers, over ended sessions.", nil, nil)
)

func (c spliceCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descFlowEpisodes, descFlowBytes, descBacklogEnds, descAnomalies, descDupSkbs, descDupBytes} {
		ch <- d
	}
}

func (c spliceCollector) Collect(ch chan<- prometheus.Metric) {
	episodes, relayed := c.sp.FlowControl()
	skbs, dup := c.sp.KernelDuplicates()
	for _, v := range []struct {
		d *prometheus.Desc
		n uint64
	}{
		{descFlowEpisodes, episodes}, {descFlowBytes, relayed}, {descBacklogEnds, c.sp.BacklogLimitEnds()},
		{descAnomalies, c.sp.Anomalies()}, {descDupSkbs, skbs}, {descDupBytes, dup},
	} {
		ch <- prometheus.MustNewConstMetric(v.d, prometheus.CounterValue, float64(v.n))
	}
}
