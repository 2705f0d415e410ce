// The type the dashboard JSON must satisfy: @grafana/schema's Dashboard, as JSON.
//
// Two adjustments, both narrowing or exact, never loosening:
//
// - `AsJson`: @grafana/schema declares some fields with TypeScript string enums
//   (FieldColorModeId, ThresholdsMode, ...). A string enum is nominal: not even the exact
//   string "thresholds" is assignable to FieldColorModeId, only FieldColorModeId.Thresholds,
//   which JSON cannot contain. Grafana stores the enum's value in the JSON model, so each
//   string enum is replaced by the union of its values (`${E}`): "thresholds" passes,
//   "treshold" does not. Numeric enums (VariableRefresh, DashboardCursorSync, ...) already
//   accept exactly their member values, as do string literal unions; everything else is
//   kept as it is.
// - Prometheus queries: a panel's `targets` are `Record<string, unknown>` in the schema and
//   an annotation's `target` a bare DataQuery; here both are Prometheus queries, so `expr`
//   is required and typed, and an unknown field is an error.
import type {
  AnnotationContainer,
  AnnotationQuery,
  Dashboard,
  DataQuery,
  Panel,
  RowPanel,
} from '@grafana/schema';

export type AsJson<T> = T extends string
  ? string extends T
    ? string
    : `${T}`
  : T extends number | boolean | null | undefined
    ? T
    : T extends Array<infer U>
      ? Array<AsJson<U>>
      : T extends object
        ? { [K in keyof T]: AsJson<T[K]> }
        : T;

export interface PrometheusQuery extends DataQuery {
  expr: string;
  legendFormat?: string;
  editorMode?: 'code' | 'builder';
  range?: boolean;
  instant?: boolean;
  interval?: string;
  format?: 'time_series' | 'table' | 'heatmap';
}

interface PrometheusPanel extends Omit<Panel, 'targets'> {
  targets?: PrometheusQuery[];
}

interface PrometheusRow extends Omit<RowPanel, 'panels'> {
  panels: PrometheusPanel[];
}

interface PrometheusAnnotations extends Omit<AnnotationContainer, 'list'> {
  list?: AnnotationQuery<PrometheusQuery>[];
}

interface PrometheusDashboard extends Omit<Dashboard, 'panels' | 'annotations'> {
  panels?: Array<PrometheusPanel | PrometheusRow>;
  annotations?: PrometheusAnnotations;
}

/** What dashboards/imap-gateway.json must satisfy. */
export type GatewayDashboard = AsJson<PrometheusDashboard>;

/** @grafana/schema's Dashboard as JSON, without the narrowing above. */
export type JsonDashboard = AsJson<Dashboard>;
