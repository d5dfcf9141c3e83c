package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/pgmfa/pgmfa/loop/spare"
)

// spareCollector reads the spare-connection pool's counters (loop/spare)
// at scrape time.
type spareCollector struct{ p *spare.Pool }

var (
	descSpares = prometheus.NewDesc("pgmfa_spare_conns",
		"Spare database connections held now (--spare-conns): opened ahead of the logins that will use them.", nil, nil)
	descSpareRequests = prometheus.NewDesc("pgmfa_spare_conn_requests_total",
		"Database connections asked for by logins and cancel forwards, by whether a spare was ready (used) or the database was dialed then (missed).", []string{"result"}, nil)
	descSpareDiscards = prometheus.NewDesc("pgmfa_spare_conns_discarded_total",
		"Spare connections closed unused, by reason: expired (--spare-max-age passed) or dead (the database had closed it, e.g. its authentication_timeout).", []string{"reason"}, nil)
	descSpareDialErrors = prometheus.NewDesc("pgmfa_spare_conn_dial_errors_total",
		"Spare connections that could not be opened (the next login tries again).", nil, nil)
)

func (c spareCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descSpares, descSpareRequests, descSpareDiscards, descSpareDialErrors} {
		ch <- d
	}
}

func (c spareCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.p.Stats()
	ch <- prometheus.MustNewConstMetric(descSpares, prometheus.GaugeValue, float64(c.p.Len()))
	ch <- prometheus.MustNewConstMetric(descSpareRequests, prometheus.CounterValue, float64(st.Used.Load()), "used")
	ch <- prometheus.MustNewConstMetric(descSpareRequests, prometheus.CounterValue, float64(st.Missed.Load()), "missed")
	ch <- prometheus.MustNewConstMetric(descSpareDiscards, prometheus.CounterValue, float64(st.Expired.Load()), "expired")
	ch <- prometheus.MustNewConstMetric(descSpareDiscards, prometheus.CounterValue, float64(st.Dead.Load()), "dead")
	ch <- prometheus.MustNewConstMetric(descSpareDialErrors, prometheus.CounterValue, float64(st.DialErrors.Load()))
}
