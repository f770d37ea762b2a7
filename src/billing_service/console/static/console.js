// The console's charts. Data comes from <script type="application/json" id="chart-data"> (never inline code);
// Chart.js (vendored, MIT) draws on the canvases. No network requests.
(function () {
  "use strict";
  var source = document.getElementById("chart-data");
  if (!source || typeof Chart === "undefined") return;
  var data = JSON.parse(source.textContent);
  var palette = ["#2f5bea", "#12b76a", "#f79009", "#7a5af8", "#ee46bc", "#06aed4", "#667085"];
  var fmt = new Intl.NumberFormat("en-US");
  Chart.defaults.animation = false;
  Chart.defaults.font.family = getComputedStyle(document.documentElement).fontFamily;
  Chart.defaults.color = "#667085";
  Chart.defaults.maintainAspectRatio = false;

  // One point per second, the balance at its end: far finer than a month's chart can show, and Chart.js's
  // filler drew a wrong triangle over the whole area when a long series ended in rows milliseconds apart (a
  // demo account's last writes; a busy agent's too).
  function bySecond(times, values) {
    var points = [];
    for (var i = 0; i < times.length; i++) {
      var second = Math.floor(times[i] / 1000) * 1000;
      var last = points[points.length - 1];
      if (last && last.x === second) last.y = values[i];
      else points.push({ x: second, y: values[i] });
    }
    return points;
  }

  function empty(canvas, text) {
    var box = canvas.parentNode;
    var note = document.createElement("p");
    note.className = "muted";
    note.textContent = text;
    box.replaceChild(note, canvas);
  }

  var balance = document.getElementById("chart-balance");
  if (balance) {
    if (!data.balance.t.length) empty(balance, "No transactions yet.");
    else new Chart(balance, {
      type: "line",
      data: { datasets: [{
        label: "Balance",
        data: bySecond(data.balance.t, data.balance.v),
        borderColor: palette[0], backgroundColor: "rgba(47,91,234,0.08)", fill: true,
        stepped: "before", pointRadius: 0, borderWidth: 2
      }] },
      options: {
        plugins: { legend: { display: false }, tooltip: { callbacks: {
          title: function (items) { return new Date(items[0].parsed.x).toISOString().slice(0, 16).replace("T", " ") + " UTC"; },
          label: function (item) { return fmt.format(item.parsed.y) + " tokens"; }
        } } },
        interaction: { mode: "index", intersect: false },
        scales: {
          x: { type: "linear", min: data.balance.t[0], max: data.balance.t[data.balance.t.length - 1], ticks: { maxTicksLimit: 7, callback: function (v) {
            return new Date(v).toISOString().slice(5, 10);
          } }, grid: { display: false } },
          y: { beginAtZero: true, ticks: { callback: function (v) { return fmt.format(v); } } }
        }
      }
    });
  }

  var daily = document.getElementById("chart-daily");
  if (daily) {
    if (!data.daily.days.length) empty(daily, "No spend in the last 31 days.");
    else new Chart(daily, {
      type: "bar",
      data: {
        labels: data.daily.days.map(function (d) { return d.slice(5); }),
        datasets: data.daily.models.map(function (m, i) {
          return { label: m.model, data: m.values, backgroundColor: palette[i % palette.length], borderWidth: 0 };
        })
      },
      options: {
        plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } } },
        scales: {
          x: { stacked: true, grid: { display: false }, ticks: { maxRotation: 0, autoSkipPadding: 8 } },
          y: { stacked: true, ticks: { callback: function (v) { return fmt.format(v); } } }
        }
      }
    });
  }

  var runs = document.getElementById("chart-runs");
  if (runs) {
    if (!data.runs.length) empty(runs, "No runs in the last 31 days.");
    else new Chart(runs, {
      type: "bar",
      data: {
        labels: data.runs.map(function (r) { return r.run_id.length > 18 ? r.run_id.slice(0, 17) + "…" : r.run_id; }),
        datasets: [{ label: "Tokens", data: data.runs.map(function (r) { return r.tokens; }),
                     backgroundColor: palette[3], borderWidth: 0 }]
      },
      options: {
        indexAxis: "y",
        plugins: { legend: { display: false } },
        scales: {
          x: { ticks: { maxTicksLimit: 5, callback: function (v) { return fmt.format(v); } } },
          y: { grid: { display: false }, ticks: { font: { size: 11 } } }
        }
      }
    });
  }
})();
