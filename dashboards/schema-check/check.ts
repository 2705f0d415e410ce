// generated/dashboard.ts checks the dashboard literal against GatewayDashboard (with excess
// property checks). This assignment checks that a GatewayDashboard is a plain
// @grafana/schema Dashboard (as JSON) too, i.e. that types.ts only ever narrows the schema.
import type { JsonDashboard } from './types.ts';
import { dashboard } from './generated/dashboard.ts';

export const checked: JsonDashboard = dashboard;
